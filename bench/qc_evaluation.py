"""How well inference's quality control tells frontal chest radiographs from everything else.

    python bench/qc_evaluation.py          # pip install -e ".[bench]" first (scikit-image)

Real frontal radiographs: the validation split (train.yaml's: seed 0, fold 0, 20 %) of each shared data
set. Inputs that are not frontal chest radiographs, built deterministically in a temporary folder
outside the repository:

- ``noise``: uniform and Gaussian noise; ``blank``: constant frames; ``gradient``: linear and radial ramps;
- ``photograph``: scikit-image's sample photographs and textures (``skimage.data``); ``document``: its
  scanned page and text; ``other_medical``: its retina, cell and histology images and the Shepp-Logan
  phantom;
- from the validation radiographs: ``rotated_90`` (counter-clockwise), ``rotated_270``, ``upside_down``
  and ``negative`` (grey scale inverted), 12 each.

The QC model (``models/qc_model.npz``) was fitted on the training split alone and has seen none of these
categories. Each set runs through the real CLI (``python -m monai.bundle run inference``, masks only) with
the lung model, and with ``--anatomy`` also the anatomy model. Reported: the share of inputs flagged
(``qc_score`` below 0.5) per category and per data set, and which flags fired. Writes
``bench/results/qc_evaluation.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inference_agreement.run_cli

SETS = {"montgomery": "masks", "shenzhen": "masks", "jsrt_scr": "structures/lungs"}
PHOTOGRAPHS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "horse", "clock",
               "hubble_deep_field", "brick", "grass", "gravel", "logo", "colorwheel", "checkerboard", "binary_blobs")
OTHER_MEDICAL = ("shepp_logan_phantom", "retina", "cell", "immunohistochemistry", "microaneurysms")
TURNED = 12  # radiographs per turned / inverted category


def _grey8(array) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=-1)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255 if a.max() > 255 or a.min() < 0 else a
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def build(work: Path, data_root: Path) -> dict[str, Path]:
    """Write every category's PNGs into ``work/<category>``; returns {category: folder}."""
    import skimage.data

    from scripts.data import split_datalist

    folders: dict[str, list[tuple[str, np.ndarray]]] = {}
    validation = []
    for name, masks in SETS.items():
        pairs = split_datalist({"dir": str(data_root / name), "masks": masks})["validation"]
        folders[f"frontal_{name}"] = [(Path(p["image"]).stem, None) for p in pairs]
        validation += [p["image"] for p in pairs]
    rng = np.random.default_rng(0)
    folders["noise"] = [(f"uniform{k}", rng.integers(0, 256, (512, 512))) for k in range(4)] + \
        [(f"gaussian{k}", np.clip(rng.normal(128, 40, (400, 500)), 0, 255)) for k in range(3)]
    folders["blank"] = [("black", np.zeros((256, 256))), ("grey", np.full((300, 300), 128)),
                        ("white", np.full((512, 400), 255))]
    yy, xx = np.mgrid[0:512, 0:512] / 511.0
    folders["gradient"] = [("left_right", xx * 255), ("top_bottom", yy * 255),
                           ("radial", np.hypot(xx - 0.5, yy - 0.5) * 255 / 0.71), ("bottom_top", (1 - yy) * 255)]
    folders["photograph"] = [(n, getattr(skimage.data, n)()) for n in PHOTOGRAPHS]
    folders["document"] = [("page", skimage.data.page()), ("text", skimage.data.text())]
    folders["other_medical"] = [(n, getattr(skimage.data, n)()) for n in OTHER_MEDICAL]
    picked = validation[:: max(1, len(validation) // (2 * TURNED))][: 2 * TURNED]
    for category, images, change in (("rotated_90", picked[:TURNED], lambda a: np.rot90(a, 1)),
                                     ("rotated_270", picked[TURNED:], lambda a: np.rot90(a, 3)),
                                     ("upside_down", picked[:TURNED], lambda a: np.rot90(a, 2)),
                                     ("negative", picked[TURNED:], lambda a: 255 - a)):
        folders[category] = [(Path(p).stem, change(np.asarray(Image.open(p).convert("L")))) for p in images]
    out = {}
    for category, items in folders.items():
        folder = work / category
        folder.mkdir(parents=True)
        for stem, array in items:
            if array is None:  # a real radiograph: linked, not copied
                source = next(p for p in validation if Path(p).stem == stem)
                (folder / Path(source).name).symlink_to(source)
            else:
                Image.fromarray(_grey8(array)).save(folder / f"{stem}.png")
        out[category] = folder
    return out


def run(folder: Path, output: Path, configs: list[str]) -> list[dict]:
    """The CLI on ``folder`` (masks only), as inference_agreement.py runs it; the rows of its results.csv."""
    from inference_agreement import run_cli

    run_cli(REPO, configs, folder, output)
    with open(output / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--anatomy", action="store_true", help="also the anatomy model (anatomy.yaml)")
    args = parser.parse_args()
    models = {"lungs": []} | ({"anatomy": ["anatomy.yaml"]} if args.anatomy else {})
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": []}
    with tempfile.TemporaryDirectory(prefix="cxr_qc_") as work:
        folders = build(Path(work) / "in", Path(args.data_root))
        for model, configs in models.items():
            for category, folder in folders.items():
                rows = run(folder, Path(work) / "out" / model / category, configs)
                flagged = [r for r in rows if r["status"] != "ok" or float(r["qc_score"]) < 0.5]
                flags = Counter(f for r in rows for f in r["qc_flags"].split(";") if f)
                report["rows"].append({"model": model, "category": category, "n": len(rows),
                                       "flagged": len(flagged), "failed": sum(r["status"] != "ok" for r in rows),
                                       "median_qc_score": float(np.median([float(r["qc_score"] or 0) for r in rows])),
                                       "flags": dict(flags.most_common())})
                print(report["rows"][-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qc_evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Inference QC on frontal radiographs (validation split) and on inputs that are not frontal chest "
             f"radiographs (none of them seen by the QC model). `{report['command']}`", "",
             "| model | inputs | n | flagged | median qc_score | flags that fired (count) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        flags = ", ".join(f"{k} {v}" for k, v in r["flags"].items()) or "–"
        share = 100 * r["flagged"] / r["n"]
        lines.append(f"| {r['model']} | {r['category']} | {r['n']} | {r['flagged']} ({share:.0f} %) "
                     f"| {r['median_qc_score']:.2f} | {flags} |")
    for model in models:
        rows = [r for r in report["rows"] if r["model"] == model]
        real = [r for r in rows if r["category"].startswith("frontal_")]
        other = [r for r in rows if not r["category"].startswith("frontal_")]
        n_real, f_real = sum(r["n"] for r in real), sum(r["flagged"] for r in real)
        n_other, f_other = sum(r["n"] for r in other), sum(r["flagged"] for r in other)
        lines.append(f"\n{model} model: frontal radiographs flagged {f_real} of {n_real} "
                     f"({100 * f_real / n_real:.1f} %, target at most 3 %); other inputs flagged {f_other} of "
                     f"{n_other} ({100 * f_other / n_other:.1f} %, target at least 95 %).")
    (RESULTS / "qc_evaluation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
