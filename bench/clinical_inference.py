"""Clinical-size inference: the bundle's CLI against a lean mask-only loop and the naive loop (issue #15).

    python bench/clinical_inference.py --n_studies 60 --repeats 2

Input: ``--n_studies`` studies built deterministically from the shared data (taken in turn from montgomery,
shenzhen and jsrt_scr, each set sorted), each upscaled to 2500 rows x 2048 columns (image: OpenCV cubic plus
a little seeded noise; lung mask: linear, thresholded at 0.5) and written as 12-bit DX DICOM (Digital X-Ray
For Presentation, ImagerPixelSpacing 0.14 mm, RescaleSlope/Intercept, every other study MONOCHROME1 stored
inverted, de-identified) by the tests' ``write_dicom``. They and the upscaled reference lung masks (PNG) go
to ``--work_dir`` (outside the repository: the data are licensed), which later runs re-use; every run
rebuilds a few studies to check that the build gives the same pixels.

Variants, each in its own process, ``--repeats`` rounds, the variants in turn within a round (medians):
- ``bundle``: the real CLI, ``python -m monai.bundle run inference`` with inference.yaml and its default
  outputs (mask, overlay, DICOM SEG, results.csv), ``--progress False``, weights bundle/models/model.pt (the
  default ``cpu_bf16 auto``: bfloat16 autocast on CPUs with AVX-512 BF16/AMX, float32 elsewhere);
- ``bundle_fp32``: the same in float32 on any CPU (``--cpu_bf16 False``);
- ``bundle_masks_only``: the same with ``--write_overlay False --write_dicom_seg False``;
- ``lean``: the lean single-process mask-only loop of issue #15 (pydicom, modality LUT, MONOCHROME1
  inversion, percentiles of a 1/16 subsample, area resize, CLAHE, the UNet at batch 1, the sign of the
  bilinearly upsampled logit difference, PNG), float32; its process does nothing else (the check of its
  network inputs against the bundle's preprocessing runs after the rounds, in a process of its own);
- ``naive``: ``inference_throughput.run_naive`` (PIL-style read, MONAI array transforms, batch 1, argmax,
  nearest resize back, PNG), given the DICOM pixels through a stand-in for ``PIL.Image.open``.
Reported: studies/s without start-up and over the whole run, peak resident memory (``ru_maxrss``, the
largest process), mean Dice of each variant's lung masks against the references, the agreement of the
bundle's masks with the lean loop's, and the ratios bundle/lean, bundle_masks_only/lean (target >= 1.0x) and
bundle/naive. A last run profiles inference.yaml's ``run`` (cProfile, one process, ``--profile_studies``).
Writes ``bench/results/clinical_inference.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import inference_throughput as it  # bench/ is on sys.path when this file runs as a script

REPO, BUNDLE, RESULTS = it.REPO, it.BUNDLE, it.RESULTS
CONFIG_ARG = "bundle/configs/inference.yaml"  # the CLI runs in the repository root, as a user types it
WEIGHTS = BUNDLE / "models" / "model.pt"
ROWS, COLUMNS, SPACING_MM = 2500, 2048, (0.14, 0.14)
NOISE_SIGMA = 3.0  # 12-bit grey levels of seeded Gaussian noise on the upscaled image
RESCALES = ((1.0, 0.0), (0.5, -1024.0), (2.0, 100.0))  # (RescaleSlope, RescaleIntercept), in turn
BUILD = {"rows": ROWS, "columns": COLUMNS, "spacing_mm": SPACING_MM, "bits_stored": 12,
         "noise_sigma": NOISE_SIGMA, "rescales": RESCALES, "version": 1}
VARIANTS = ("bundle", "bundle_fp32", "bundle_masks_only", "lean", "naive")
TARGET_VS_LEAN = 1.0
CLEAN_LOAD = 0.10  # a round counts when other processes took at most this share of the machine meanwhile
NETWORK_SIZE, CLAHE_CLIP, CLAHE_GRID = 256, 2.0, (8, 8)  # as inference.yaml (spatial_size, clahe_*)


# ---- the studies (main process) ------------------------------------------------------------------


def reference_source(image: Path) -> Path:
    """The lung mask of a shared-data image (jsrt_scr: structures/lungs, 0/1; the others: masks/, 1 = lungs)."""
    root = image.parents[1]
    return root / ("structures/lungs" if root.name == "jsrt_scr" else "masks") / image.name


def pixel_hash(array) -> str:
    import numpy as np

    array = np.ascontiguousarray(array)
    return hashlib.sha256(str((array.dtype.str, array.shape)).encode() + array.tobytes()).hexdigest()


def make_study(image: Path, index: int):
    """(stored 12-bit pixels, MONOCHROME1?, rescale, reference lung mask 0/1) of study ``index``."""
    import cv2
    import numpy as np

    grey = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    big = cv2.resize(grey, (COLUMNS, ROWS), interpolation=cv2.INTER_CUBIC) * (4095 / 255)
    big += np.random.default_rng(index).normal(0.0, NOISE_SIGMA, big.shape).astype(np.float32)
    values = np.clip(np.rint(big), 0, 4095).astype(np.uint16)
    monochrome1 = index % 2 == 1
    stored = 4095 - values if monochrome1 else values  # MONOCHROME1: high stored values are dark
    lungs = (cv2.imread(str(reference_source(image)), cv2.IMREAD_GRAYSCALE) == 1).astype(np.float32)
    reference = (cv2.resize(lungs, (COLUMNS, ROWS), interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.uint8)
    return stored, monochrome1, RESCALES[(index // 2) % len(RESCALES)], reference


def write_study(image: Path, index: int, dicom: Path, reference_png: Path) -> dict:
    """Write study ``index`` (DICOM and reference PNG); returns its manifest entry with the pixel hashes."""
    import cv2

    sys.path.insert(0, str(REPO / "tests"))
    from dicom_fixtures import write_dicom

    stored, monochrome1, rescale, reference = make_study(image, index)
    dicom.parent.mkdir(parents=True, exist_ok=True)
    reference_png.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(dicom, stored, bits_stored=12, monochrome1=monochrome1, rescale=rescale, spacing=SPACING_MM,
                sop_class="DX", deidentified=True, patient_id=f"CXR-BENCH-{index:04d}")
    cv2.imwrite(str(reference_png), reference)
    return {"index": index, "source": f"{image.parents[1].name}/images/{image.name}", "monochrome1": monochrome1,
            "rescale": rescale, "pixel_sha256": pixel_hash(stored), "reference_sha256": pixel_hash(reference)}


def study_paths(work: Path, image: Path, copy: int) -> tuple[str, Path, Path]:
    """(relative name, DICOM path, reference PNG path) of a selected image in the work folder."""
    name = f"{image.parents[1].name}/{Path(it.link_name(image, copy)).stem}"
    return name, work / "studies" / f"{name}.dcm", work / "reference" / f"{name}.png"


def build(args, work: Path) -> list[dict]:
    """The first ``n_studies`` studies, built where missing; ``work/in`` links exactly these."""
    images = it.select_images(Path(args.data_root), args.n_studies)
    if not images:
        sys.exit(f"no images under {args.data_root}")
    manifest_file = work / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    if manifest.get("build") != json.loads(json.dumps(BUILD)):  # other settings: start again
        shutil.rmtree(work / "studies", ignore_errors=True)
        shutil.rmtree(work / "reference", ignore_errors=True)
        manifest = {"build": BUILD, "studies": {}}
    distinct, studies, built = len(set(images)), [], 0
    for index, image in enumerate(images):
        name, dicom, reference = study_paths(work, image, index // distinct)
        entry = manifest["studies"].get(name)
        if entry is None or entry["index"] != index or not (dicom.is_file() and reference.is_file()):
            entry = manifest["studies"][name] = write_study(image, index, dicom, reference)
            built += 1
        studies.append({"name": name, **entry})
    manifest_file.write_text(json.dumps(manifest, indent=1))
    print(f"{len(studies)} studies in {work} ({built} built now)", flush=True)
    for folder, chosen in (("in", studies), ("profile_in", studies[:args.profile_studies]),
                           ("warmup_in", studies[:1])):
        shutil.rmtree(work / folder, ignore_errors=True)
        for s in chosen:
            link = work / folder / f"{s['name']}.dcm"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(work / "studies" / f"{s['name']}.dcm")
    return studies


def check_determinism(args, work: Path, studies: list[dict], k: int = 3) -> dict:
    """Build the first ``k`` studies again elsewhere: same pixels (DICOM and reference) as the work folder's?"""
    import cv2
    import pydicom

    images = it.select_images(Path(args.data_root), k)
    again, checked = work / "determinism_check", []
    shutil.rmtree(again, ignore_errors=True)
    for index, (image, study) in enumerate(zip(images, studies)):
        entry = write_study(image, index, again / "study.dcm", again / "reference.png")
        on_disk = pydicom.dcmread(work / "studies" / f"{study['name']}.dcm").pixel_array
        ref_on_disk = cv2.imread(str(work / "reference" / f"{study['name']}.png"), cv2.IMREAD_UNCHANGED)
        checked.append({
            "study": study["name"],
            "same_pixels": entry["pixel_sha256"] == study["pixel_sha256"] == pixel_hash(on_disk),
            "same_reference": entry["reference_sha256"] == study["reference_sha256"] == pixel_hash(ref_on_disk),
        })
    shutil.rmtree(again, ignore_errors=True)
    return {"studies": checked, "identical": all(c["same_pixels"] and c["same_reference"] for c in checked)}


# ---- variants (each in its own process) ----------------------------------------------------------


def read_dicom(path):
    """A radiograph as float32 (rows, columns), bright bone: pydicom, modality LUT, MONOCHROME1 inverted."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    array = ds.pixel_array.astype(np.float32)
    array *= float(getattr(ds, "RescaleSlope", 1.0))
    array += float(getattr(ds, "RescaleIntercept", 0.0))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        array = array.max() + array.min() - array
    return array


def _peak_mb() -> float:
    import resource

    return max(it._peak_mb(resource.RUSAGE_SELF), it._peak_mb(resource.RUSAGE_CHILDREN))


def run_bundle(args) -> dict:
    """The real CLI on ``work/in``; start-up and the evaluator's run from its log time stamps."""
    out = os.path.join(args.work_dir, f"out_{args.variant}_{args.round}")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--bundle_root", "bundle", "--config_file",
           CONFIG_ARG, "--input_dir", os.path.join(args.work_dir, "in"), "--output_dir", out, "--progress", "False"]
    if args.variant == "bundle_masks_only":
        cmd += ["--write_overlay", "False", "--write_dicom_seg", "False"]
    if args.variant == "bundle_fp32":  # float32 whatever the CPU (the default cpu_bf16 auto is bfloat16 where it pays)
        cmd += ["--cpu_bf16", "False"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    total = time.time() - t0
    log = proc.stdout + proc.stderr
    Path(args.work_dir, f"log_{args.variant}_{args.round}.txt").write_text(log)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}")
    started, finished = it.STARTED.search(log), it.FINISHED.search(log)
    run_s = it._log_time(finished.group(1)) - it._log_time(started.group(1)) if started and finished else None
    with open(os.path.join(out, "results.csv")) as f:
        statuses = [row["status"] for row in csv.DictReader(f)]
    return {
        "command": [os.path.basename(cmd[0])] + cmd[1:],
        "n_studies": len(statuses),
        "n_ok": statuses.count("ok"),
        "cli_total_s": total,
        "startup_s": it._log_time(started.group(1)) - t0 if started else None,
        "run_s": run_s,
        "studies_per_s": len(statuses) / run_s if run_s else None,
        "peak_rss_mb": _peak_mb(),
    }


def lean_network(weights: str):
    """The lean loop's network (the shipped UNet, float32) and its preprocessing: ``network_input(path)`` gives
    the (rows', columns') network input in [0, 1] and the native (rows, columns)."""
    import cv2
    import numpy as np
    import torch
    from monai.networks.nets import UNet

    network = UNet(2, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    network.eval()
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_GRID[::-1])  # OpenCV: (columns, rows)

    def network_input(path):
        image = read_dicom(path)
        low, high = np.percentile(image[::4, ::4], (0.5, 99.5))
        image -= low
        image *= 1.0 / (high - low) if high > low else 1.0
        np.clip(image, 0.0, 1.0, out=image)
        small = cv2.resize(image, (NETWORK_SIZE, NETWORK_SIZE), interpolation=cv2.INTER_AREA)
        small = clahe.apply(np.rint(small * 255).astype(np.uint8)).astype(np.float32) / 255
        return small, image.shape

    return network, network_input


def run_lean(args) -> dict:
    """The lean mask-only loop of issue #15, batch 1, one process (nothing else in it: its whole run is its own)."""
    import cv2
    import numpy as np
    import torch

    network, network_input = lean_network(args.weights)
    files = it._inputs(args)
    out = Path(args.work_dir, f"out_{args.variant}_{args.round}")
    start = time.time()
    for path in files:
        small, (rows, columns) = network_input(path)
        with torch.inference_mode():
            logits = network(torch.from_numpy(small)[None, None])[0]
        difference = (logits[1] - logits[0]).numpy()
        mask = cv2.resize(difference, (columns, rows), interpolation=cv2.INTER_LINEAR) > 0
        target = out / Path(path).parent.name / f"{Path(path).stem}_seg.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), mask.astype(np.uint8))
    run_s = time.time() - start
    return {"n_studies": len(files), "n_ok": len(files), "startup_s": start - args.t0, "run_s": run_s,
            "studies_per_s": len(files) / run_s, "peak_rss_mb": _peak_mb()}


def run_lean_input_check(args) -> dict:
    """How far the lean loop's network inputs are from the bundle's on the first 3 studies (a process of its
    own, after the timed rounds)."""
    return compare_inputs(it._inputs(args)[:3], lean_network(args.weights)[1])


def compare_inputs(files: list[str], network_input) -> dict:
    """How far the lean loop's network inputs are from the bundle's preprocessing (not timed)."""
    import numpy as np

    try:
        preprocessing = it._parser({}).get_parsed_content("preprocessing")
        diffs = [np.abs(np.asarray(preprocessing({"image": f})["image"])[0] - network_input(f)[0]) for f in files]
    except Exception as e:  # noqa: BLE001 (a reworked config may differ; the benchmark goes on)
        return {"error": f"{type(e).__name__}: {e}"}
    return {"studies": len(files), "mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
            "max_abs_diff": float(max(d.max() for d in diffs))}


class DicomAsPil:
    """What ``PIL.Image.open`` gives ``run_naive`` for a DICOM file: ``convert`` returns the pixels of
    :func:`read_dicom`, so the loop's ``np.asarray(img.convert("L"), dtype=np.float32)`` is the image."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def convert(self, mode):
        return read_dicom(self.path)


def run_naive(args) -> dict:
    """``inference_throughput.run_naive`` on the DICOM studies (its masks: out/<set>_<stem>_seg.png)."""
    import PIL.Image

    open_image = PIL.Image.open
    PIL.Image.open = lambda path, *a, **k: DicomAsPil(path) if str(path).endswith(".dcm") else open_image(path, *a, **k)
    args.keep_outputs = True  # the main process reads the masks for the Dice, then removes them
    row = it.run_naive(args)
    return {"n_studies": row["n_images"], "n_ok": row["n_ok"], "startup_s": row["startup_s"], "run_s": row["run_s"],
            "studies_per_s": row["images_per_s"], "peak_rss_mb": _peak_mb()}


def run_profile(args) -> dict:
    """inference.yaml's ``run`` in this process under cProfile on ``work/profile_in``, after an unprofiled run
    on one study (imports and one-time set-ups out of the way); ``num_workers 0`` and ``write_workers 0``, so
    that reading and writing run in the profiled thread."""
    import cProfile
    import pstats

    out = os.path.join(args.work_dir, "out_profile")

    def parsed(folder: str):
        shutil.rmtree(out, ignore_errors=True)
        parser = it._parser({"input_dir": os.path.join(args.work_dir, folder), "output_dir": out,
                             "progress": False})
        parser.update({k: 0 for k in ("num_workers", "write_workers") if parser.get(k) is not None})
        parser.get_parsed_content("initialize")
        return parser

    parsed("warmup_in").get_parsed_content("run")
    parser = parsed("profile_in")
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(parser.get_parsed_content, "run")
    total = time.perf_counter() - start
    n = sum(len(files) for _, _, files in os.walk(os.path.join(args.work_dir, "profile_in")))
    shutil.rmtree(out, ignore_errors=True)
    stats = pstats.Stats(profiler).stats

    def top(column: int, keep=lambda key: True, count: int = 20) -> list[dict]:
        rows = sorted(((k, v) for k, v in stats.items() if keep(k)), key=lambda kv: -kv[1][column])[:count]
        return [{"function": _function_name(key), "calls": value[1], "own_s": value[2], "cumulative_s": value[3]}
                for key, value in rows]

    return {"n_studies": n, "run_s": total, "studies_per_s": n / total,
            "overrides": {k: parser[k] for k in ("num_workers", "write_workers") if parser.get(k) is not None},
            "top_bundle_cumulative": top(3, lambda key: key[0].startswith(str(BUNDLE))), "top_own": top(2),
            "peak_rss_mb": _peak_mb()}


def _function_name(key: tuple) -> str:
    """``path:line(name)`` of a pstats key, the path shortened: from the repository, from site-packages,
    or from the Python version's folder."""
    filename, line, name = key
    if filename == "~":
        return name  # a built-in
    parts = Path(filename).parts
    if "site-packages" in parts:
        filename = "/".join(parts[parts.index("site-packages") + 1:])
    elif Path(filename).is_relative_to(REPO):
        filename = str(Path(filename).relative_to(REPO))
    elif "lib" in parts:
        filename = "/".join(parts[parts.index("lib") + 1:])
    return f"{filename}:{line}({name})"


# ---- main process --------------------------------------------------------------------------------


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; steal counts as busy)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _launch(variant: str, work: Path, round_: int) -> dict:
    """Run one variant in its own process; also how much of the machine other processes took meanwhile."""
    t0, busy, ours = time.time(), _busy_cpu_s(), _children_cpu_s()
    cmd = [sys.executable, __file__, "--variant", variant, "--work_dir", str(work), "--weights", str(WEIGHTS),
           "--round", str(round_), "--t0", repr(t0)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.time() - t0
    others = (_busy_cpu_s() - busy) - (_children_cpu_s() - ours)
    if proc.returncode:
        raise RuntimeError(f"variant {variant} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if "n_studies" in row:
        row.update(total_s=total, studies_per_s_total=row["n_studies"] / total,
                   other_load=max(0.0, others / (total * os.cpu_count())))
    return {"variant": variant, "round": round_, **row}


def mask_path(work: Path, variant: str, name: str) -> Path:
    """Where a variant's round-0 run put the mask of study ``name`` (``<set>/<stem>``)."""
    folder, stem = name.split("/")
    out = work / f"out_{variant}_0"
    return out / f"{folder}_{stem}_seg.png" if variant == "naive" else out / folder / f"{stem}_seg.png"


def dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def read_mask(path: Path):
    """A PNG as written (uint8), or None when there is none."""
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None


def dice_table(work: Path, studies: list[dict]) -> dict:
    """Per variant: Dice of its lung masks (label 1) against the references; and bundle against lean."""
    per: dict[str, list] = {v: [] for v in VARIANTS + ("bundle_vs_lean",)}
    for s in studies:
        reference = read_mask(work / "reference" / f"{s['name']}.png") == 1
        masks = {v: read_mask(mask_path(work, v, s["name"])) for v in VARIANTS}
        for v, mask in masks.items():
            per[v].append(None if mask is None else dice(mask == 1, reference))
        both = masks["bundle"] is not None and masks["lean"] is not None
        per["bundle_vs_lean"].append(dice(masks["bundle"] == 1, masks["lean"] == 1) if both else None)
    table = {}
    for key, values in per.items():
        found = [v for v in values if v is not None]
        table[key] = {"mean": statistics.mean(found) if found else None, "min": min(found) if found else None,
                      "missing": len(values) - len(found),
                      "per_study": [None if v is None else round(v, 4) for v in values]}
    return table


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Medians per variant over its clean rounds (other processes took at most ``CLEAN_LOAD`` of the machine;
    all rounds when none was clean), peak memory the maximum; and the ratios of issue #15."""
    summary = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        clean = [r for r in mine if r["other_load"] <= CLEAN_LOAD]
        used = clean or mine
        s = {"variant": variant, "rounds": len(mine), "clean_rounds": len(clean), "n_studies": mine[0]["n_studies"],
             "n_ok": min(r["n_ok"] for r in mine), "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
             "other_load_max": max(r["other_load"] for r in used)}
        for key in ("studies_per_s", "studies_per_s_total", "total_s", "startup_s", "run_s"):
            s[key] = it._median(used, key)
        summary.append(s)
    by = {s["variant"]: s for s in summary}
    ratios = []
    for a, b in (("bundle", "lean"), ("bundle_fp32", "lean"), ("bundle_masks_only", "lean"), ("bundle", "naive"),
                 ("bundle_masks_only", "naive"), ("lean", "naive")):
        no_startup = by[a]["studies_per_s"] / by[b]["studies_per_s"] if by[a]["studies_per_s"] else None
        ratios.append({"ratio": f"{a}/{b}", "no_startup": no_startup,
                       "whole_run": by[a]["studies_per_s_total"] / by[b]["studies_per_s_total"],
                       "target": TARGET_VS_LEAN if a in ("bundle", "bundle_masks_only") and b == "lean" else None})
    return summary, ratios


def code_state() -> dict:
    """The commit, the bundle's files that differ from it, and a hash of the bundle's code and configs
    (other people edit them while this runs)."""
    def git(*a):
        return subprocess.run(["git", "--no-optional-locks", *a], cwd=REPO, capture_output=True, text=True).stdout

    digest = hashlib.sha256()
    for path in sorted(BUNDLE.glob("scripts/*.py")) + sorted(BUNDLE.glob("configs/*")):
        digest.update(path.name.encode() + path.read_bytes())
    return {"commit": git("rev-parse", "HEAD").strip(),
            "bundle_changes": git("status", "--porcelain", "--", "bundle").splitlines(),
            "bundle_sha256": digest.hexdigest()}


def markdown(report: dict) -> str:
    st, dc = report["settings"], report["dice"]
    lines = [
        f"Clinical-size inference, {st['n_studies']} studies ({report['studies_note']}), {st['repeats']} round(s); "
        f"medians of the clean rounds (other processes took at most {CLEAN_LOAD:.0%} of the machine meanwhile; all "
        f"rounds for a variant without one), peak memory: maximum; {report['machine']}. Weights: "
        f"bundle/models/model.pt. `{report['command']}`",
        "",
        "| variant | studies/s (no start-up) | studies/s (whole run) | wall (s) | start-up (s) | clean rounds | ok "
        "| peak memory (MB) | Dice vs reference (mean, min) | other load (max of those used) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["summary"]:
        d = dc[s["variant"]]
        missing = f", {d['missing']} missing" if d["missing"] else ""
        lines.append(
            f"| {s['variant']} | {it._fmt(s['studies_per_s'], 2)} | {it._fmt(s['studies_per_s_total'], 2)} "
            f"| {it._fmt(s['total_s'])} | {it._fmt(s['startup_s'])} | {s['clean_rounds']}/{s['rounds']} "
            f"| {s['n_ok']}/{s['n_studies']} "
            f"| {s['peak_rss_mb']:.0f} | {it._fmt(d['mean'], 4)}, {it._fmt(d['min'], 4)}{missing} "
            f"| {100 * s['other_load_max']:.0f} % |")
    lines += ["", "| ratio | no start-up | whole run | target |", "| --- | --- | --- | --- |"]
    for r in report["ratios"]:
        target = "–"
        if r["target"] is not None and r["no_startup"] is not None:
            met = "met" if min(r["no_startup"], r["whole_run"]) >= r["target"] else "NOT met"
            target = f">= {r['target']:.1f}x: {met}"
        lines.append(f"| {r['ratio']} | {it._fmt(r['no_startup'], 2, 'x')} | {r['whole_run']:.2f}x | {target} |")
    agree, check = dc["bundle_vs_lean"], report["lean_input_check"]
    lines += [
        "",
        f"Agreement of the bundle's masks with the lean loop's: mean Dice {it._fmt(agree['mean'], 4)} (min "
        f"{it._fmt(agree['min'], 4)}). Lean network inputs against the bundle's preprocessing on "
        + (f"{check['studies']} studies: mean |difference| {check['mean_abs_diff']:.4f}, max "
           f"{check['max_abs_diff']:.4f} (percentiles of a 1/16 subsample, OpenCV area resize)."
           if "error" not in check else f"not compared ({check['error']})."),
        f"Determinism: {len(report['determinism']['studies'])} studies built again: "
        + ("same pixels and reference masks." if report["determinism"]["identical"] else "DIFFERENT pixels: "
           + json.dumps(report["determinism"]["studies"])),
        "",
        "`bundle` writes per study a mask, an overlay and a DICOM SEG, and a results.csv row, and cleans the masks "
        "(largest components, filled holes); `bundle_masks_only` the masks and results.csv; `lean` and `naive` the "
        "masks only. Start-up: process launch until the evaluator starts (CLI log time stamps) or the loop starts; "
        "the whole run includes it and the process exit. Peak memory: the largest single process (DataLoader "
        "workers are processes of their own).",
    ]
    lines += ["", "Other load: the share of the machine's CPU time that other processes took while the variant ran "
              "(from /proc/stat less this run's own processes; hypervisor steal included)."]
    if any(not s["clean_rounds"] for s in report["summary"]):
        lines += ["", f"**Some variants had no clean round (other processes took more than {CLEAN_LOAD:.0%} of the "
                  "machine): their timings are disturbed.**"]
    if report["code_state"]["before"]["bundle_sha256"] != report["code_state"]["after"]["bundle_sha256"]:
        lines += ["", "**The bundle's code changed during this run** (see `code_state` in the JSON)."]
    profile = report.get("profile")
    if profile:
        lines += [
            "",
            f"Where the time goes: inference.yaml's `run` in one process under cProfile on {profile['n_studies']} "
            f"studies, after an unprofiled run on one study in the same process (default outputs, "
            f"{', '.join(f'{k} {v}' for k, v in profile['overrides'].items()) or 'no overrides'}: all the work in "
            f"the profiled thread; {profile['run_s']:.1f} s, {profile['studies_per_s']:.2f} studies/s with the "
            f"profiler's overhead; other load {profile['other_load']:.0%}). The bundle's own functions by cumulative "
            "time, then all functions by own time:",
        ]
        for key, title in (("top_bundle_cumulative", "the bundle's, by cumulative time"), ("top_own", "by own time")):
            lines += ["", f"| function ({title}) | calls | own (s) | cumulative (s) |", "| --- | --- | --- | --- |"]
            lines += [f"| `{r['function']}` | {r['calls']} | {r['own_s']:.2f} | {r['cumulative_s']:.2f} |"
                      for r in profile[key]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_studies", type=int, default=60, help="studies, taken in turn from the three sets")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every variant; medians are reported")
    ap.add_argument("--work_dir", default="/tmp/cxr_bench_clinical",
                    help="studies, references and outputs, outside the repository; re-used")
    ap.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--profile_studies", type=int, default=12, help="studies of the cProfile run")
    ap.add_argument("--no_profile", action="store_true", help="skip the cProfile run")
    ap.add_argument("--keep_outputs", action="store_true", help="keep the round-0 outputs in the work folder")
    for hidden in ("--variant", "--weights", "--round", "--t0"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        run = {"bundle": run_bundle, "bundle_fp32": run_bundle, "bundle_masks_only": run_bundle, "lean": run_lean,
               "naive": run_naive, "profile": run_profile, "lean_input_check": run_lean_input_check}[args.variant]
        args.round, args.t0 = int(args.round), float(args.t0)
        print(json.dumps(run(args)))
        return

    work = Path(args.work_dir).resolve()
    if work.is_relative_to(REPO.resolve()):
        sys.exit(f"--work_dir {work} lies inside the repository: the shared data must not be copied there")
    if not WEIGHTS.is_file():
        sys.exit(f"no weights at {WEIGHTS}")
    work.mkdir(parents=True, exist_ok=True)
    studies = build(args, work)
    determinism = check_determinism(args, work, studies)
    print(f"determinism: {'same pixels' if determinism['identical'] else 'DIFFERENT'}", flush=True)
    before, load_before = code_state(), os.getloadavg()
    rows = []
    for round_ in range(args.repeats):
        for variant in VARIANTS:
            out = work / f"out_{variant}_{round_}"
            shutil.rmtree(out, ignore_errors=True)
            rows.append(_launch(variant, work, round_))
            if round_:
                shutil.rmtree(out, ignore_errors=True)
            print(f"round {round_ + 1}/{args.repeats} {variant}: {it._fmt(rows[-1]['studies_per_s'], 2)} studies/s, "
                  f"{rows[-1]['studies_per_s_total']:.2f} over the whole run", flush=True)
    profile = None if args.no_profile else _launch("profile", work, 0)
    input_check = _launch("lean_input_check", work, 0)
    dice_by_variant = dice_table(work, studies)
    if not args.keep_outputs:
        for variant in VARIANTS:
            shutil.rmtree(work / f"out_{variant}_0", ignore_errors=True)
    summary, ratios = summarise(rows)
    per_set = {s: sum(x["name"].startswith(s + "/") for x in studies) for s in it.SETS}
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "machine": it.machine(),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "code_state": {"before": before, "after": code_state()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("variant", "weights", "round", "t0")},
        "build": BUILD,
        "studies_note": ", ".join(f"{n} {s}" for s, n in per_set.items())
        + f"; {ROWS}x{COLUMNS} 12-bit DX DICOM, {sum(s['monochrome1'] for s in studies)} MONOCHROME1",
        "studies": studies,
        "determinism": determinism,
        "bundle_command": " ".join(next(r["command"] for r in rows if r["variant"] == "bundle")),
        "summary": summary,
        "ratios": ratios,
        "dice": dice_by_variant,
        "lean_input_check": input_check,
        "profile": profile,
        "rounds": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "clinical_inference.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (RESULTS / "clinical_inference.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
