"""Masks of folder inference against the expert masks, and against the masks of an earlier version.

    python bench/inference_agreement.py --baseline fce03c0

Inputs: the validation split (train.yaml's seeded split: seed 0, fold 0, 20 %) of each shared data set,
as symlinks in a temporary folder outside the repository. The lung model (`model.pt`) segments all
three sets; the anatomy model (`model_anatomy.pt`, with anatomy.yaml) segments JSRT. Both versions run
the real CLI (`python -m monai.bundle run inference`, masks only) with the shipped weights: this
checkout, and `--baseline` (any git revision; checked out with `git worktree` in a temporary folder,
removed at the end).

Reported per data set and class: the mean Dice of each version's masks against the expert masks at the
native size, and the agreement of the two versions' masks (mean and lowest Dice, and the share of pixels
that differ). Writes ``bench/results/inference_agreement.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(REPO / "bundle"))

# (data set, expert label folder, model, extra config, class names scored)
RUNS = [
    ("montgomery", "masks", "lungs", [], ["lungs"]),
    ("shenzhen", "masks", "lungs", [], ["lungs"]),
    ("jsrt_scr", "structures/lungs", "lungs", [], ["lungs"]),
    ("jsrt_scr", "masks", "anatomy", ["anatomy.yaml"], ["lungs", "heart", "clavicles"]),
]


def validation_images(data_root: Path, name: str, masks: str) -> list[dict]:
    """train.yaml's validation split (seed 0, fold 0, val_fraction 0.2) of one data set."""
    from scripts.data import split_datalist

    return split_datalist({"dir": str(data_root / name), "masks": masks})["validation"]


def run_cli(repo: Path, configs: list[str], input_dir: Path, output_dir: Path) -> None:
    """The bundle's CLI of the checkout ``repo`` on a folder: masks only, shipped weights."""
    bundle = repo / "bundle"
    files = [str(bundle / "configs" / "inference.yaml")] + [str(bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--bundle_root", str(bundle),
           "--config_file", str(files), "--input_dir", str(input_dir), "--output_dir", str(output_dir),
           "--write_overlay", "False", "--write_dicom_seg", "False", "--progress", "False"]
    result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{repo}: inference failed\n{result.stderr[-3000:]}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def compare(pairs: list[dict], new_dir: Path, old_dir: Path, classes: list[str], all_classes: list[str]) -> dict:
    """Per class: Dice of the new and the old masks against the experts', and new against old."""
    out = {c: {"new": [], "old": [], "agreement": [], "differing_pixels": []} for c in classes}
    for pair in pairs:
        stem = Path(pair["image"]).stem
        expert = np.asarray(Image.open(pair["label"]))
        new = np.asarray(Image.open(new_dir / f"{stem}_seg.png"))
        old = np.asarray(Image.open(old_dir / f"{stem}_seg.png"))
        for c in classes:
            value = all_classes.index(c)
            truth = expert == value if expert.max() > 1 else expert > 0
            out[c]["new"].append(dice(new == value, truth))
            out[c]["old"].append(dice(old == value, truth))
            out[c]["agreement"].append(dice(new == value, old == value))
            out[c]["differing_pixels"].append(float(((new == value) != (old == value)).mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="fce03c0", help="git revision to compare with (default: the "
                        "version before inference decided at network size)")
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    data_root = Path(args.data_root)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "baseline": args.baseline,
              "head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="cxr_agreement_") as work:
        work = Path(work)
        old_repo = work / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_repo), args.baseline], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for name, masks, model, configs, classes in RUNS:
                pairs = validation_images(data_root, name, masks)
                inputs = work / f"{name}_{model}" / "in"
                inputs.mkdir(parents=True)
                for pair in pairs:
                    os.symlink(pair["image"], inputs / Path(pair["image"]).name)
                new_dir, old_dir = inputs.parent / "new", inputs.parent / "old"
                run_cli(REPO, configs, inputs, new_dir)
                run_cli(old_repo, configs, inputs, old_dir)
                all_classes = ["background", "lungs", "heart", "clavicles"] if model == "anatomy" else \
                    ["background", "lungs"]
                for c, values in compare(pairs, new_dir, old_dir, classes, all_classes).items():
                    report["rows"].append({
                        "dataset": name, "model": model, "class": c, "n": len(pairs),
                        "dice_new": float(np.mean(values["new"])), "dice_old": float(np.mean(values["old"])),
                        "agreement_mean": float(np.mean(values["agreement"])),
                        "agreement_min": float(np.min(values["agreement"])),
                        "differing_pixels": float(np.mean(values["differing_pixels"])),
                    })
                    print(report["rows"][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_repo)], cwd=REPO, capture_output=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference_agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Folder inference masks against the expert masks (native size, validation split: seed 0, fold 0), "
             f"this version ({report['head']}) and {args.baseline}, shipped weights. `{report['command']}`", "",
             "| data set | model | class | n | Dice, this version | Dice, baseline | agreement (mean Dice) | "
             "agreement (lowest) | pixels that differ |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['class']} | {r['n']} | {r['dice_new']:.4f} | "
                     f"{r['dice_old']:.4f} | {r['agreement_mean']:.4f} | {r['agreement_min']:.4f} | "
                     f"{100 * r['differing_pixels']:.2f} % |")
    (RESULTS / "inference_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
