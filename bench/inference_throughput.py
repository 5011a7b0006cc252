"""Folder-inference throughput of the bundle against a naive per-image loop and the network alone.

    python bench/inference_throughput.py --n_images 500 --batch_size 8

Input: a temporary folder (outside the repository) of symlinks to the first ``--n_images`` radiographs
of the shared data, taken in turn from montgomery, shenzhen and jsrt_scr (mixed sizes and sources).
Weights: ``--ckpt_path``, else ``bundle/models/model.pt``, else a seeded freshly initialised UNet (speed
does not depend on the values of the weights; the post-processing and the overlays work on masks that
look like noise then, which the report says).

Variants, each run in its own process (so that start-up and peak memory are its own), ``--repeats``
rounds, the variants in turn within a round (a slow stretch of a shared machine hits all of them):
- ``bundle``: the real CLI, ``python -m monai.bundle run inference`` with inference.yaml on the folder
  (masks, overlays, results.csv, post-processing, all the defaults but ``--progress False``);
  The default ``cpu_bf16 auto`` runs the network under bfloat16 autocast where the CPU computes it natively
  (AVX-512 BF16, AMX) and in float32 elsewhere (the report says which);
- ``bundle_fp32``: the same in float32 on any CPU (``--cpu_bf16 False``);
- ``bundle_masks_only``: ``bundle`` with ``--write_overlay False``: the naive loop's outputs (masks), plus
  results.csv and the mask clean-up;
- ``naive``: the per-image loop a notebook would write: PIL read, the same preprocessing with MONAI
  array transforms, the network at batch 1, argmax, resize back (nearest), PNG mask only;
- ``network_fp32`` / ``network_bf16`` / ``network_onnx``: the ceiling, the network alone on preloaded,
  already preprocessed tensors at ``--batch_size`` (float32, bfloat16 autocast, ONNX Runtime when
  onnx and onnxruntime are installed).
Reported (medians over the rounds; peak memory the maximum): images/s without the start-up (start-up:
process launch until the evaluator starts, from the CLI's log time stamps; for ``naive`` until its
loop starts), images/s over the whole wall time, time to the first ``*_seg.png`` (its mtime minus the
process launch), peak resident memory (``ru_maxrss``: for the CLI the largest of its processes, the
DataLoader workers included), efficiency (images/s against the network alone, same precision) and
speedup against ``naive``. A last single run (``stages``) runs the bundle's evaluator in-process with
``num_workers 0`` and times each stage (reading, each preprocessing transform, network, each
post-processing transform, measures, mask PNG, overlay re-read, drawing and PNG). Writes
``bench/results/inference_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIG = BUNDLE / "configs" / "inference.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("montgomery", "shenzhen", "jsrt_scr")
END_TO_END = ("bundle", "bundle_fp32", "bundle_masks_only", "naive")
NETWORK = ("network_fp32", "network_bf16", "network_onnx")
CEILING = {"bundle_fp32": "network_fp32", "naive": "network_fp32"}  # and bundle, bundle_masks_only: see summarise
TARGET_SPEEDUP = 2.0  # issue #15: the bundle (its defaults) at least 2x the naive loop
# the evaluator's first and last log lines (ignite, formatted by bundle/configs/logging.conf)
LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - .*"
STARTED = re.compile(LOG_TIME + r"Engine run (?:resuming from|starting with)", re.M)
FINISHED = re.compile(LOG_TIME + r"Engine run finished", re.M)


# ---- set-up (main process) -----------------------------------------------------------------------


def select_images(data_root: Path, n: int) -> list[Path]:
    """The first ``n`` images, one from each set in turn (each set's files sorted); past the last image
    the same order starts again (the links of the repeats get a ``_copyK`` suffix: ``link_name``)."""
    lists = [sorted(glob.glob(str(data_root / s / "images" / "*"))) for s in SETS]
    picked, i = [], 0
    while any(i < len(files) for files in lists):
        picked += [Path(files[i]) for files in lists if i < len(files)]
        i += 1
    return [picked[k % len(picked)] for k in range(n)] if picked else []


def link_name(path: Path, copy: int) -> str:
    """The name of the link to ``path``: its own name, ``<stem>_copyK<suffix>`` for its K-th repeat."""
    return path.name if not copy else f"{path.stem}_copy{copy}{path.suffix}"


def default_precision() -> tuple[str, str]:
    """The network variant whose precision inference.yaml's default (``cpu_bf16: auto``) gives on this CPU, and
    a note saying so."""
    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    from scripts.inferers import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return "network_bf16", "bfloat16 autocast (this CPU has AVX-512 BF16 or AMX)"
    return "network_fp32", "float32 (this CPU has neither AVX-512 BF16 nor AMX)"


def make_weights(args, work: Path) -> tuple[Path, str]:
    """The weights file to use and a note saying which it is."""
    if args.ckpt_path:
        return Path(args.ckpt_path).resolve(), f"{args.ckpt_path} (--ckpt_path)"
    trained = BUNDLE / "models" / "model.pt"
    if trained.is_file():
        return trained, "bundle/models/model.pt"
    import torch

    torch.manual_seed(0)
    network = _parser({}).get_parsed_content("network_def")
    path = work / "random_weights.pt"
    torch.save(network.state_dict(), path)
    return path, ("freshly initialised UNet, seed 0 (no bundle/models/model.pt): the speed of the network is the "
                  "same, but the masks are noise, so post-processing and overlays may cost more or less than "
                  "with trained weights")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in text)
    except OSError:
        pass
    return (f"{cpu} ({os.cpu_count()} logical CPUs{'; ' + flags if flags else ''}), {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")


# ---- helpers of the variants ---------------------------------------------------------------------


def _parser(overrides: dict):
    from monai.bundle import ConfigParser

    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


def _network(args, parser=None):
    import torch

    parser = parser or _parser({})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    return network.eval()


def _inputs(args) -> list[str]:
    return sorted(glob.glob(os.path.join(args.work_dir, "in", "*", "*")))


def _first_mtime(folder: str, pattern: str = "*_seg.png") -> float | None:
    times = [os.path.getmtime(p) for p in glob.glob(os.path.join(folder, "**", pattern), recursive=True)]
    return min(times) if times else None


def _log_time(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


# ---- variants (each in its own process) ----------------------------------------------------------


def run_bundle(args) -> dict:
    """The real CLI on the folder; start-up and the evaluator's run from its log time stamps."""
    out = os.path.join(args.work_dir, f"out_{args.variant}_{args.round}")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--bundle_root", str(BUNDLE),
           "--config_file", str(CONFIG), "--input_dir", os.path.join(args.work_dir, "in"), "--output_dir", out,
           "--ckpt_path", args.weights, "--batch_size", str(args.batch_size), "--progress", "False"]
    if args.num_workers is not None:
        cmd += ["--num_workers", str(args.num_workers)]
    if args.variant == "bundle_fp32":
        cmd += ["--cpu_bf16", "False"]
    if args.variant == "bundle_masks_only":  # the outputs of the naive loop: masks (and results.csv), no overlays
        cmd += ["--write_overlay", "False"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    total = time.time() - t0
    log = proc.stdout + proc.stderr
    Path(args.work_dir, f"log_{args.variant}_{args.round}.txt").write_text(log)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}")
    started, finished = STARTED.search(log), FINISHED.search(log)
    start_s = _log_time(started.group(1)) - t0 if started else None
    run_s = _log_time(finished.group(1)) - _log_time(started.group(1)) if started and finished else None
    first = _first_mtime(out)
    with open(os.path.join(out, "results.csv")) as f:
        statuses = [row["status"] for row in csv.DictReader(f)]
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "command": cmd,
        "n_images": len(statuses),
        "n_ok": statuses.count("ok"),
        "total_s": total,
        "startup_s": start_s,
        "run_s": run_s,
        "teardown_s": total - start_s - run_s if run_s is not None else None,
        "first_mask_s": first - t0 if first else None,
        "images_per_s": len(statuses) / run_s if run_s else None,
        "images_per_s_total": len(statuses) / total,
        "peak_rss_mb": _peak_mb(resource.RUSAGE_CHILDREN),
    }


def run_naive(args) -> dict:
    """The per-image loop of a notebook: same preprocessing and network, batch 1, mask PNG only."""
    import numpy as np
    import torch
    from monai.transforms import Compose, EnsureChannelFirst, EnsureType, Resize, ScaleIntensityRangePercentiles
    from PIL import Image

    sys.path.insert(0, str(BUNDLE))
    from scripts.transforms import CLAHE

    parser = _parser({})
    size = [int(s) for s in parser["spatial_size"]]
    network = _network(args, parser)
    preprocess = Compose([
        EnsureChannelFirst(channel_dim="no_channel"),
        ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        Resize(spatial_size=size, mode="area"),
        CLAHE(clip_limit=parser["clahe_clip_limit"], tile_grid_size=parser["clahe_tile_grid"]),
        EnsureType(dtype=torch.float32),
    ])
    out = Path(args.work_dir, f"out_{args.variant}_{args.round}")
    out.mkdir()
    files = _inputs(args)
    start = time.time()
    first = None
    for path in files:
        with Image.open(path) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float32)
        image = preprocess(grey)
        with torch.no_grad():
            logits = network(image[None])
        mask = torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)
        mask = Image.fromarray(mask).resize((grey.shape[1], grey.shape[0]), Image.NEAREST)
        mask.save(out / f"{Path(path).parent.name}_{Path(path).stem}_seg.png")
        first = first or time.time()
    run_s = time.time() - start
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "n_images": len(files),
        "n_ok": len(files),
        "startup_s": start - args.t0,
        "run_s": run_s,
        "first_mask_s": first - args.t0,
        "images_per_s": len(files) / run_s,
        "peak_rss_mb": _peak_mb(),
    }


def _preloaded(args):
    """All the inputs through the bundle's own preprocessing, stacked: (N, 1, H, W) float32."""
    import torch

    preprocessing = _parser({}).get_parsed_content("preprocessing")
    return torch.stack([preprocessing({"image": p})["image"].as_tensor().float() for p in _inputs(args)])


def run_network(args) -> dict:
    """The network alone on preloaded tensors at the batch size: one warm-up pass of 2 batches, one timed pass."""
    import numpy as np
    import torch

    images = _preloaded(args)
    batches = list(torch.split(images, args.batch_size))
    network = _network(args)
    if args.variant == "network_onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime as ort
        except ImportError as e:
            return {"skipped": f"needs onnx and onnxruntime ({e})"}
        path = os.path.join(args.work_dir, "model.onnx")
        if not os.path.exists(path):
            torch.onnx.export(network, batches[0][:1], path, input_names=["image"], output_names=["pred"], dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}})
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

        def forward(x):
            return session.run(["pred"], {"image": np.ascontiguousarray(x.numpy())})[0]
    else:
        bf16 = args.variant == "network_bf16"

        def forward(x):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return network(x).float()

    for x in batches[:2]:
        forward(x)
    start = time.perf_counter()
    for x in batches:
        forward(x)
    run_s = time.perf_counter() - start
    return {"n_images": len(images), "run_s": run_s, "images_per_s": len(images) / run_s, "peak_rss_mb": _peak_mb()}


def run_stages(args) -> dict:
    """The bundle's evaluator in this process (num_workers 0, write_workers 0, default precision), each stage timed;
    the preprocessing runs at 1 torch thread, as it does in the CLI's DataLoader workers (torch sets 1 thread there)."""
    import torch

    out = os.path.join(args.work_dir, "out_stages")
    parser = _parser({"input_dir": os.path.join(args.work_dir, "in"), "output_dir": out, "ckpt_path": args.weights,
                      "batch_size": args.batch_size, "num_workers": 0, "progress": False,
                      "write_workers": 0})  # stages one after the other, so that their times add up
    parser.get_parsed_content("initialize")
    import scripts.dicom_seg
    import scripts.outputs as si

    spent: dict[str, float] = {}

    def timed(name, fn):
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return call

    class Timed:  # a transform of a Compose, timed; with ``threads``, run at that many torch threads
        def __init__(self, name, transform, threads=None):
            self.name, self.transform, self.threads = name, transform, threads

        def __call__(self, data, *a, **k):
            before = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                return timed(self.name, self.transform)(data, *a, **k)
            finally:
                torch.set_num_threads(before)

    preprocessing = parser.get_parsed_content("preprocessing")
    names = {"LoadImaged": "read file (LoadImaged)", "CLAHEd": "CLAHE"}
    preprocessing.transforms = tuple(
        Timed("pre: " + names.get(type(t).__name__, type(t).__name__), t, threads=1)  # as in a DataLoader worker
        for t in preprocessing.transforms)
    postprocessing = parser.get_parsed_content("postprocessing")
    postprocessing.transforms = tuple(Timed("post: " + type(t).__name__, t) for t in postprocessing.transforms)
    network = parser.get_parsed_content("network")
    marks = {}
    network.register_forward_pre_hook(lambda m, i: marks.__setitem__("start", time.perf_counter()))
    network.register_forward_hook(lambda m, i, o: spent.__setitem__(
        "network (batches)", spent.get("network (batches)", 0.0) + time.perf_counter() - marks["start"]))
    si.decide_at_size = timed("write: decision at the native size", si.decide_at_size)
    si.save_mask_png = timed("write: mask PNG", si.save_mask_png)
    si.save_png = timed("write: overlay PNG", si.save_png)
    si.save_jpeg = timed("write: overlay JPEG", si.save_jpeg)
    si.render_overlay = timed("write: draw the overlay", si.render_overlay)
    si.measure = timed("write: measures (areas, CTR, QC)", si.measure)
    scripts.dicom_seg.make_dicom_seg = timed("write: DICOM SEG", scripts.dicom_seg.make_dicom_seg)
    evaluator = parser.get_parsed_content("evaluator")
    torch.manual_seed(0)
    start = time.perf_counter()
    evaluator.run()
    total = time.perf_counter() - start
    n = len(_inputs(args))
    shutil.rmtree(out, ignore_errors=True)
    stages = [{"stage": k, "s": v, "ms_per_image": 1000 * v / n, "share": v / total} for k, v in spent.items()]
    rest = total - sum(spent.values())
    stages.append({"stage": "other (engine, collate/decollate, CSV, ...)", "s": rest, "ms_per_image": 1000 * rest / n,
                   "share": rest / total})
    return {"n_images": n, "run_s": total, "images_per_s": n / total, "stages": stages, "peak_rss_mb": _peak_mb()}


# ---- main process --------------------------------------------------------------------------------


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(value, digits=1, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _launch(args, variant: str, work: Path, weights: Path, round_: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--work_dir", str(work), "--weights", str(weights),
           "--round", str(round_), "--t0", repr(time.time())] + sys.argv[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.time() - float(cmd[cmd.index("--t0") + 1])
    if proc.returncode:
        raise RuntimeError(f"variant {variant} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if variant == "naive":
        row["total_s"] = total
        row["images_per_s_total"] = row["n_images"] / total
    return {"variant": variant, "round": round_, **row}


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for variant in END_TO_END + NETWORK:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        if any("skipped" in r for r in mine):
            summary.append({"variant": variant, "skipped": mine[0]["skipped"]})
            continue
        s = {"variant": variant, "rounds": len(mine)}
        for key in ("images_per_s", "images_per_s_total", "total_s", "startup_s", "run_s", "teardown_s",
                    "first_mask_s"):
            s[key] = _median(mine, key)
        s["peak_rss_mb"] = max(r["peak_rss_mb"] for r in mine)
        s["n_images"], s["n_ok"] = mine[0]["n_images"], min(r.get("n_ok", r["n_images"]) for r in mine)
        summary.append(s)
    by = {s["variant"]: s for s in summary if "skipped" not in s}
    naive = by.get("naive")
    default = default_precision()[0]  # the network alone in the precision the defaults run in on this CPU
    ceilings = {"bundle": default, "bundle_masks_only": default, **CEILING}
    for s in summary:
        ceiling = by.get(ceilings.get(s["variant"], ""))
        if ceiling and s.get("images_per_s"):
            s["efficiency"] = s["images_per_s"] / ceiling["images_per_s"]
            s["efficiency_total"] = s["images_per_s_total"] / ceiling["images_per_s"]
            s["ceiling"] = ceiling["variant"]
        if naive and s.get("images_per_s") and s["variant"] in END_TO_END:
            s["speedup_vs_naive"] = s["images_per_s"] / naive["images_per_s"]
            s["speedup_vs_naive_total"] = s["images_per_s_total"] / naive["images_per_s_total"]
    return summary


def markdown(report: dict) -> str:
    st = report["settings"]
    lines = [
        f"Folder inference throughput, {report['n_images']} radiographs ({report['images_note']}), batch "
        f"{st['batch_size']}, medians of {st['repeats']} round(s) (peak memory: maximum); {report['machine']}. "
        f"Weights: {report['weights']}. `{report['command']}`",
        "",
        "| variant | images/s (no start-up) | images/s (whole run) | wall (s) | start-up (s) | first mask (s) "
        "| vs network-only | vs naive | peak memory (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["summary"]:
        if "skipped" in s:
            lines.append(f"| {s['variant']} | skipped: {s['skipped']} | | | | | | | |")
            continue
        eff = (f"{100 * s['efficiency']:.0f} % ({100 * s['efficiency_total']:.0f} % whole run) of {s['ceiling']}"
               if "efficiency" in s else "–")
        speed = (f"{s['speedup_vs_naive']:.2f}x ({s['speedup_vs_naive_total']:.2f}x whole run)"
                 if "speedup_vs_naive" in s else "–")
        lines.append(
            f"| {s['variant']} | {_fmt(s['images_per_s'])} | {_fmt(s.get('images_per_s_total'))} "
            f"| {_fmt(s.get('total_s'))} | {_fmt(s.get('startup_s'))} | {_fmt(s.get('first_mask_s'))} | {eff} "
            f"| {speed} | {s['peak_rss_mb']:.0f} |")
    by = {s["variant"]: s for s in report["summary"]}
    bundle = by.get("bundle", {})
    if "speedup_vs_naive" in bundle:
        def met(value, target):
            return "met" if value >= target else "NOT met"

        speed, speed_all = bundle["speedup_vs_naive"], bundle["speedup_vs_naive_total"]
        lines += ["", f"Target (reported, not asserted), `bundle` with its defaults: >= "
                  f"{TARGET_SPEEDUP:.0f}x the naive loop: {speed:.2f}x without start-up "
                  f"({met(speed, TARGET_SPEEDUP)}), "
                  f"{speed_all:.2f}x over the whole run ({met(speed_all, TARGET_SPEEDUP)})."]
    lines += [
        "",
        "`bundle` writes a mask, an overlay and a results.csv row per image and cleans the masks (largest components, "
        "filled holes); `naive` writes the mask only. Start-up: process launch until the evaluator starts (CLI log "
        "time stamps) or the loop starts; the whole run includes it and the process exit. "
        f"Precision of `bundle` and `bundle_masks_only` (inference.yaml's cpu_bf16 auto): {report['precision']}.",
    ]
    stages = report.get("stages")
    if stages:
        lines += [
            "",
            "Where the time goes: the bundle's evaluator in one process (num_workers 0, write_workers 0, default "
            "precision, "
            f"{stages['n_images']} images, {stages['images_per_s']:.1f} images/s, one run; the preprocessing at 1 "
            "torch thread as in the CLI's DataLoader workers, the rest at the default threads; network: whole "
            "batches):",
            "",
            "| stage | s | ms/image | share |",
            "| --- | --- | --- | --- |",
        ]
        for row in sorted(stages["stages"], key=lambda r: -r["s"]):
            lines.append(
                f"| {row['stage']} | {row['s']:.2f} | {row['ms_per_image']:.1f} | {100 * row['share']:.0f} % |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_images", type=int, default=500,
                    help="radiographs, taken in turn from the three sets (cycled past the 700 there are)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every variant; medians are reported")
    ap.add_argument("--num_workers", type=int, default=None, help="the bundle's --num_workers (default: its own)")
    ap.add_argument("--ckpt_path", default=None, help="weights (default: bundle/models/model.pt, else random)")
    ap.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--no_stages", action="store_true", help="skip the per-stage profile of the bundle")
    ap.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime network-only row")
    ap.add_argument("--keep_outputs", action="store_true", help="keep the temporary folder and the outputs")
    for hidden in ("--variant", "--work_dir", "--weights", "--round", "--t0"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        run = {"bundle": run_bundle, "bundle_fp32": run_bundle, "bundle_masks_only": run_bundle, "naive": run_naive,
               "stages": run_stages}
        args.t0 = float(args.t0)
        print(json.dumps(run.get(args.variant, run_network)(args)))
        return

    images = select_images(Path(args.data_root), args.n_images)
    distinct = len(set(images))
    if images and distinct < args.n_images:
        print(f"only {distinct} images under {args.data_root}: cycled, with _copyK links", file=sys.stderr)
    if not images:
        sys.exit(f"no images under {args.data_root}/{{{','.join(SETS)}}}/images")
    work = Path(tempfile.mkdtemp(prefix="cxr_inference_bench_"))
    try:
        for k, path in enumerate(images):
            link = work / "in" / path.parents[1].name / link_name(path, k // distinct)
            link.parent.mkdir(parents=True, exist_ok=True)
            if k < distinct:
                link.symlink_to(path)
            else:  # a repeat is a file of its own: inference lists a second link to one file once
                shutil.copyfile(path, link)
        weights, weights_note = make_weights(args, work)
        from PIL import Image

        sizes: dict[str, int] = {}
        for path in images:
            with Image.open(path) as img:
                key = f"{img.size[0]}x{img.size[1]}"
                sizes[key] = sizes.get(key, 0) + 1
        per_set = {s: sum(p.parents[1].name == s for p in images) for s in SETS}
        variants = list(END_TO_END) + [v for v in NETWORK if not (args.no_onnx and v == "network_onnx")]
        load_before = os.getloadavg()
        rows = []
        for round_ in range(args.repeats):
            for variant in variants:
                rows.append(_launch(args, variant, work, weights, round_))
                r = rows[-1]
                print(f"round {round_ + 1}/{args.repeats} {variant}: "
                      + (f"skipped ({r['skipped']})" if "skipped" in r else f"{r['images_per_s']:.1f} images/s"),
                      flush=True)
        stages = None if args.no_stages else _launch(args, "stages", work, weights, 0)
        report = {
            "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
            "machine": machine(),
            "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("variant", "work_dir", "weights", "round", "t0")},
            "n_images": len(images),
            "images_per_set": per_set,
            "image_sizes": sizes,
            "images_note": ", ".join(f"{n} {s}" for s, n in per_set.items())
            + (f"; {distinct} distinct images, cycled" if distinct < len(images) else "") + "; sizes "
            + ", ".join(f"{n}x {k}" for k, n in sorted(sizes.items(), key=lambda kv: -kv[1])),
            "weights": weights_note,
            "precision": default_precision()[1],
            "bundle_command": next((r["command"] for r in rows if r["variant"] == "bundle"), None),
            "targets": {"speedup_vs_naive": TARGET_SPEEDUP},
            "summary": summarise(rows),
            "stages": stages,
            "rounds": rows,
        }
    finally:
        if args.keep_outputs:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference_throughput.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (RESULTS / "inference_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
