"""Writing the outputs of folder inference: masks, overlays, DICOM SEGs and results.csv, and the progress bar."""

from __future__ import annotations

import csv
import dataclasses
import gc
import glob
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from .files import atomic_write
from .inputs import describe_error
from .io import may_be_dicom
from .measures import csv_columns
from .outputs import OutputFiles, study_record
from .postprocessing import output_mode
from .report import write_report

logger = logging.getLogger("cxr_segmentation.inference")

RESULTS_CSV = "results.csv"
OVERLAY_FORMATS = ("jpg", "png")


def _format_number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _bundle_version(metadata_file: str | None) -> str:
    try:
        with open(metadata_file) as f:  # type: ignore[arg-type]
            return str(json.load(f).get("version", "unknown"))
    except Exception:  # noqa: BLE001
        return "unknown"


class SegmentationWriter:
    """Ignite handler of the inference evaluator: writes every item's outputs and ``results.csv``.

    Per item (after post-processing), under ``output_dir`` with the input's relative folder:
    ``<name>_seg.png`` (uint8 label map at native size), ``<name>_overlay.jpg`` (or ``.png``; if
    ``write_overlay``) and, for DICOM inputs, ``<name>_seg.dcm`` (if ``write_dicom_seg``). Status ``ok``
    means that the mask and the measures were written. A failure to read, post-process or write the mask
    makes the row ``failed`` with the reason; an optional output (overlay, SEG) that fails leaves the row
    ``ok`` and says what was not written and why in ``warnings``. Either way a WARNING log line names the
    file. Rows are appended to ``results.csv.partial`` as they come and moved to ``results.csv`` when the
    run ends (also when it ends with an exception), so ``results.csv`` is never half written.

    The files are written by ``write_workers`` processes while the network runs on the next batch
    (:class:`scripts.outputs.OutputFiles`; they get the decision fields at network size and the display
    copy, and decide at the native size themselves); rows still go to ``results.csv`` in input order.
    Processes, not threads: the encoders and the DICOM SEG builder would otherwise take turns with the
    network for Python's interpreter lock. A writer process that dies (killed, out of memory) costs no
    study: the studies it held are written again, each in a process of its own, and only one whose own
    process dies again fails. ``write_workers`` 0 writes in the evaluator's thread.

    Sharded runs (torchrun, configs/multi_gpu_inference.yaml): rank ``r`` of ``world_size`` segments its
    share of the inputs and appends to ``results.rank<r>.csv.partial``; at the end rank 0 waits for the
    others and merges every rank's rows (and those of an earlier run, when resuming) into one
    ``results.csv`` in input order.

    Args:
        output_dir: the output folder.
        class_names: names of the class indices (``len(class_names)`` must be the network's outputs).
        num_classes: the network's output channels, checked against ``class_names``.
        input_dir: the input folder, for messages.
        write_overlay, write_dicom_seg: which optional outputs to write.
        overlay_format: ``jpg`` (quality 90, no chroma subsampling) or ``png``.
        metadata_file: the bundle's metadata.json; its version goes into the DICOM SEGs.
        write_workers: processes writing the files (0: none, write in the evaluator's thread).
        rank, world_size: this process's place in a sharded run (torch.distributed initialised when > 1).
    """

    max_pending = 32  # studies handed to the writer processes and not yet written: bounds the memory held
    # how the writer processes start: forked on Linux (at once, sharing what this process has loaded), else spawned
    start_method = "fork" if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods() \
        else "spawn"

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        num_classes: int | None = None,
        input_dir: str | None = None,
        write_overlay: bool = True,
        write_dicom_seg: bool = True,
        overlay_format: str = "jpg",
        metadata_file: str | None = None,
        write_workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.class_names = [str(c) for c in class_names]
        if num_classes is not None:
            output_mode(int(num_classes), self.class_names)  # raises when they do not fit
        if str(overlay_format).lower() not in OVERLAY_FORMATS:
            raise ValueError(f"overlay_format must be one of {OVERLAY_FORMATS}, got {overlay_format!r}")
        self.output_dir = os.path.abspath(str(output_dir))
        self.input_dir = input_dir
        # what each study gets written (the writer processes get a copy of it with every study)
        self.files = OutputFiles(self.output_dir, tuple(self.class_names), bool(write_overlay),
                                 str(overlay_format).lower(), bool(write_dicom_seg), _bundle_version(metadata_file))
        self._dicom_seg_checked = False
        self.columns = csv_columns(self.class_names)
        self.rank, self.world_size = int(rank), int(world_size)
        self.n_ok = self.n_failed = self.n_warned = 0
        self.failed: list[tuple[str, str]] = []
        self._csv = None
        self.write_workers = int(write_workers)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[tuple[dict, Future, ProcessPoolExecutor]] = deque()  # (study, row to come, its pool)
        self.carried: list[dict] = []  # results.csv rows of an earlier run in output_dir (resume)

    @property
    def write_dicom_seg(self) -> bool:
        """Whether DICOM inputs get a SEG: asked for, and (once :meth:`check_dicom_seg` has run) highdicom can write
        one here."""
        return self.files.write_dicom_seg

    def check_dicom_seg(self, inputs: Sequence[dict] | None = None) -> None:
        """Build one tiny SEG, once, when SEGs are asked for and an input may be DICOM (any, with ``inputs`` None):
        a missing or broken highdicom is then said once, here, not for every study, and its first-use work
        (imports, the standard's tables: about 0.8 s) is done before the writer processes are forked. A folder
        of PNG/JPEG/TIFF/BMP/NIfTI files skips it."""
        if self._dicom_seg_checked or not self.files.write_dicom_seg:
            return
        self._dicom_seg_checked = True
        if inputs is not None and not any(may_be_dicom(item["rel"]) for item in inputs):
            return  # no input is DICOM: no SEG will be written, nothing to check
        try:
            from .dicom_seg import warm_up

            warm_up(self.class_names, self.files.version)
            return
        except ImportError:
            logger.warning("inference: highdicom is not installed, so no DICOM SEG is written "
                           "(pip install highdicom, or --write_dicom_seg False to silence this)")
        except Exception as e:  # noqa: BLE001 - a highdicom/pydicom pair that does not work together
            logger.warning(f"inference: highdicom cannot write a DICOM SEG here ({describe_error(e)}), so none is "
                           f"written (pip install -U highdicom pydicom, or --write_dicom_seg False)")
        self.files = dataclasses.replace(self.files, write_dicom_seg=False)

    # -- sharding ----------------------------------------------------------------------------------
    def shard(self, datalist: Sequence[dict]) -> list[dict]:
        """This rank's share of the (sorted) inputs: every ``world_size``-th one from ``rank`` on."""
        return list(datalist[self.rank::self.world_size])

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @property
    def _partial_name(self) -> str:
        return RESULTS_CSV + ".partial" if self.world_size == 1 else f"results.rank{self.rank}.csv.partial"

    def _partial_files(self) -> list[str]:
        """Rows of unfinished runs: results.csv.partial and every rank's results.rank<r>.csv.partial."""
        return sorted(glob.glob(os.path.join(glob.escape(self.output_dir), "results*.csv.partial")))

    # -- resuming an interrupted run ---------------------------------------------------------------
    def still_to_do(self, datalist: Sequence[dict]) -> list[dict]:
        """The inputs an earlier run into ``output_dir`` has not finished; keeps the others' rows for results.csv.

        An input counts as done when the earlier ``results.csv`` (or the ``.partial`` files of a run that
        was killed, sharded or not) has an ``ok`` row for it and its output files exist. Failed inputs are
        tried again.
        """
        previous: dict[str, dict] = {}
        results = os.path.join(self.output_dir, RESULTS_CSV)
        for path in [results] + self._partial_files():  # the partial files of a killed run are the newer
            if os.path.isfile(path):
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    if reader.fieldnames != self.columns:
                        logger.warning(f"inference: {path} has other columns (another model?); not resuming from it")
                        continue
                    previous.update((row["path"], row) for row in reader)
        self.carried, to_do = [], []
        for record in datalist:
            row = previous.get(str(record["rel"]))
            if row and row["status"] == "ok" and all(
                    os.path.isfile(f) for f in self.files.expected(record, row.get("warnings", ""))):
                self.carried.append(row)
            else:
                to_do.append(record)
        logger.info(f"inference: resuming in {self.output_dir}: {len(self.carried)} of {len(datalist)} input(s) "
                    f"done by an earlier run, {len(to_do)} to do")
        return to_do

    def write_carried_only(self) -> None:
        """Finish a run that has nothing left to do here: results.csv from the earlier rows (and other ranks')."""
        self.started(None)
        self.completed(None)

    # -- run checks --------------------------------------------------------------------------------
    def check_ready(self, inputs: Sequence[dict], ckpt_path: str) -> None:
        """Stop with a clear error before the run when there is no input at all or no model."""
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"inference: no model weights at {ckpt_path} (set --ckpt_path, or --model_file "
                                    f"for a file in the bundle's models/ folder)")
        if not inputs:
            raise FileNotFoundError(f"inference: no radiograph (PNG/JPEG/TIFF/BMP, DICOM, NIfTI) found in "
                                    f"{self.input_dir!s}")
        self.check_dicom_seg(inputs)

    def raise_if_failed(self, fail_on_error: bool) -> None:
        """With ``fail_on_error``, end the run with an error (exit status 1) when any input failed."""
        if fail_on_error and self.n_failed:
            message = (f"inference: {self.n_failed} of {self.n_ok + self.n_failed} input(s) failed, see "
                       f"{os.path.join(self.output_dir, RESULTS_CSV)}")
            logger.error(message + " (fail_on_error: exit status 1)")
            raise RuntimeError(message)

    # -- ignite ------------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def started(self, engine) -> None:
        # every rank has read the earlier rows (still_to_do) before any rank starts its partial file anew
        self._barrier()
        self.check_dicom_seg()  # done by check_ready before a CLI run; here for evaluators run without it
        os.makedirs(self.output_dir, exist_ok=True)
        self.n_ok = self.n_failed = self.n_warned = 0
        self.failed = []
        self._close_csv()
        self._csv = open(os.path.join(self.output_dir, self._partial_name), "w", newline="")
        self._writer = csv.DictWriter(self._csv, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()
        if self.rank == 0:
            self._writer.writerows(self.carried)
            self.n_ok = len(self.carried)
        # what this process holds now (modules, model, config) is left out of garbage collection from here on:
        # the processes forked next (writers now, the DataLoader's readers at the first batch) then share it
        # without copying it page by page when they collect, and the interpreter's exit does not walk it
        # (Python's advice for fork; 2.0 s -> 0.35 s from the end of a 60-study run to the exit, docs/experiments.md)
        gc.freeze()
        if self.write_workers > 0 and self._pool is None:
            self._pool = self._new_pool(self.write_workers)

    def iteration_completed(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, dict):  # not decollated
            from monai.data import decollate_batch

            batch, output = decollate_batch(batch), decollate_batch(output)
        for item, out in zip(batch, output):
            study = study_record(item, out)
            if self._pool is None:
                self._record(study, self.files.write(study))
            else:
                self._submit(study)
        self._collect(keep=self.max_pending)
        self._csv.flush()

    def completed(self, engine) -> None:
        self._finish()

    def exception_raised(self, engine, e: Exception) -> None:
        logger.error(f"inference: stopped by {type(e).__name__}: {e}")
        self._finish(merge=False)  # a sharded run's other ranks are not waited for: rows stay in .partial files
        raise e

    # -- one study ---------------------------------------------------------------------------------
    def _record(self, study: Mapping, row: dict) -> None:
        """Count the study, log it when it failed or lost an output, append its row (evaluator's thread only)."""
        path = str(study["path"])
        if row["status"] == "failed":
            self.n_failed += 1
            self.failed.append((path, row["error"]))
            logger.warning(f"inference: failed {path}: {row['error']}")
        else:
            self.n_ok += 1
            if row.get("warnings"):
                self.n_warned += 1
                logger.warning(f"inference: {path}: {row['warnings']}")
        self._writer.writerow({k: _format_number(v) if not isinstance(v, str) else v for k, v in row.items()})

    def _collect(self, keep: int) -> None:
        """Record the written studies in input order: all that are done, and wait until at most ``keep`` remain."""
        while self._pending and (len(self._pending) > keep or self._pending[0][1].done()):
            study, future, pool = self._pending.popleft()
            try:
                row = future.result()
            except BrokenProcessPool:
                if pool is self._pool:
                    self._replace_pool()
                row = self._write_alone(study)
            self._record(study, row)

    # -- writer processes --------------------------------------------------------------------------
    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        """Processes that write the files; forked where that is safe (Linux), so they start at once. OpenCV
        runs on one thread from here on, in them and in this process (set before the fork: OpenCV's thread
        pool does not survive one): the processes share the cores with the network and the readers."""
        import cv2

        cv2.setNumThreads(1)
        pool = ProcessPoolExecutor(processes, multiprocessing.get_context(self.start_method),
                                   initializer=_writer_process_setup)
        pool.submit(int).result()  # start them now (a fork context starts all at the first task)
        return pool

    def _submit(self, study: dict) -> None:
        try:
            future = self._pool.submit(self.files.write, study)
        except BrokenProcessPool:  # a process died since the last study was handed over
            self._replace_pool()
            future = self._pool.submit(self.files.write, study)
        self._pending.append((study, future, self._pool))

    def _replace_pool(self) -> None:
        """New studies go to new processes (those the broken pool held are written again by _write_alone)."""
        self._pool.shutdown(wait=False)
        self._pool = self._new_pool(self.write_workers)

    def _write_alone(self, study: Mapping) -> dict:
        """Write a study whose writer process died (killed, out of memory, a crash in a library) again, in a
        process of its own; if that one dies too, the study fails."""
        logger.warning(f"inference: a writer process died while {study['path']} was being written; writing it again")
        try:
            with self._new_pool(1) as alone:
                return alone.submit(self.files.write, study).result()
        except BrokenProcessPool:
            return {"path": str(study["rel"]), "status": "failed",
                    "error": "the writer process died while writing this study's outputs (out of memory, or a "
                             "crash in an image library); the others were written"}

    # -- results.csv -------------------------------------------------------------------------------
    def _close_csv(self) -> None:
        if self._csv is not None and not self._csv.closed:
            self._csv.close()

    def _finish(self, merge: bool = True) -> None:
        if self._csv is None:
            return
        self._collect(keep=0)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._close_csv()
        earlier = f" ({len(self.carried)} by an earlier run)" if self.carried and self.rank == 0 else ""
        shard = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        warned = f" ({self.n_warned} without an optional output)" if self.n_warned else ""
        logger.info(f"inference: {shard}{self.n_ok} succeeded{earlier}{warned}, {self.n_failed} failed "
                    f"-> {self.output_dir}")
        partial, self._csv = self._csv.name, None
        if self.world_size == 1 and not self.carried:
            os.replace(partial, os.path.join(self.output_dir, RESULTS_CSV))
        elif self.world_size == 1 or merge:
            self._barrier()  # every rank's rows are in its partial file
            if self.rank == 0:
                self._merge([partial] if self.world_size == 1 else [
                    os.path.join(self.output_dir, f"results.rank{r}.csv.partial") for r in range(self.world_size)])
            self._barrier()  # no rank leaves before results.csv is there
        else:
            return  # a sharded run that failed: its rows stay in the .partial files for --resume
        if self.rank == 0:  # left by killed runs: their rows are in results.csv now (rank 0 carried them)
            for stale in self._partial_files():
                os.remove(stale)
            self._write_report()

    def _write_report(self) -> None:
        """OUT/report.html from results.csv (scripts/report.py); a failure is logged, results.csv stays."""
        try:
            path = write_report(self.output_dir, "_overlay." + self.files.overlay_format)
            logger.info(f"inference: review page {path}")
        except Exception as e:  # noqa: BLE001 - the page is an extra; the run's results are written
            logger.warning(f"inference: the review page was not written: {describe_error(e)}")

    def _merge(self, partials: Sequence[str]) -> None:
        """One results.csv, in input order (sorted paths), from the partial files."""
        rows = []
        for path in partials:
            with open(path, newline="") as f:
                rows += list(csv.DictReader(f))
        rows.sort(key=lambda row: row["path"])

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(os.path.join(self.output_dir, RESULTS_CSV), write)


def _writer_process_setup() -> None:
    """In each writer process: Ctrl-C is the main process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ImageProgressBar:
    """A tqdm bar over the images (not the batches) of an evaluator run, with the count, rate and ETA.

    While it runs, log lines go through ``tqdm.write`` so that they do not break the bar.
    """

    def __init__(self, writer: SegmentationWriter | None = None, desc: str = "inference"):
        self.writer = writer
        self.desc = desc
        self.bar = None
        self._redirect = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def started(self, engine) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        loader = engine.state.dataloader
        total = len(loader.dataset) if hasattr(loader, "dataset") else None
        self.bar = tqdm(total=total, desc=self.desc, unit="img", dynamic_ncols=True)
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def iteration_completed(self, engine) -> None:
        batch = engine.state.batch
        n = len(batch) if isinstance(batch, list) else len(batch["image"])
        if self.writer is not None:
            self.bar.set_postfix(failed=self.writer.n_failed, refresh=False)
        self.bar.update(n)

    def close(self, engine=None) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
