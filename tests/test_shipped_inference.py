"""The shipped weights as a user runs them: `python -m monai.bundle run inference` (a subprocess, the default
settings) on validation images of the training split (train.yaml's seeded split, which the shipped models never
trained on), the masks it writes scored against the expert masks; the same run in float32 (--cpu_bf16 False); and
`run evaluating --eval_clean True` end to end, which must score the masks that inference writes.

Every run here is a real CLI run (about 5 s of start-up each on 2 CPU cores); the inputs are copied into
tmp_path, never into the repository."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from PIL import Image

from conftest import BUNDLE, REPO, SHARED_DATA, shared_dataset

CONFIGS = BUNDLE / "configs"
LUNG_SETS = ("montgomery", "shenzhen", "jsrt_scr")
N_PER_SET = 4  # the first validation images of each data set in the split's order
# two more Shenzhen validation images on which the clean-up (largest components, filled holes) changes the
# shipped lung model's prediction: raw / cleaned Dice 0.948 / 0.970 and 0.968 / 0.973 (HD95 29 / 3.6 and
# 28 / 6.7 px), so that the eval_clean test below can tell a cleaned score from a raw one
CLEAN_SENSITIVE = ("CHNCXR_0238_0", "CHNCXR_0593_1")

# Dice of the shipped model.pt's mask (inference's <name>_seg.png == 1) against the expert's lung fields
# (JSRT: structures/lungs), measured on 2 CPU cores in float32 (the default, cpu_bf16 auto, is bfloat16 on CPUs
# with AVX-512 BF16/AMX and moves a few boundary pixels: within the margin); each must reach its value - 0.01
LUNG_DICE = {
    "MCUCXR_0043_0": 0.969, "MCUCXR_0063_0": 0.984, "MCUCXR_0313_1": 0.982, "MCUCXR_0126_1": 0.872,
    "CHNCXR_0302_0": 0.973, "CHNCXR_0285_0": 0.941, "CHNCXR_0632_1": 0.971, "CHNCXR_0437_1": 0.963,
    "CHNCXR_0238_0": 0.970, "CHNCXR_0593_1": 0.973,
    "JPCLN050": 0.982, "JPCNN062": 0.972, "JPCNN047": 0.986, "JPCLN066": 0.982,
}
# Dice per structure of the anatomy model's label map (1 lungs, 2 heart, 3 clavicles; an overlap goes to the
# later class, as in the expert's masks/) against masks/, measured likewise; each must reach its value - 0.01
N_ANATOMY = 3
ANATOMY_DICE = {  # lungs, heart, clavicles
    "JPCLN050": (0.982, 0.970, 0.953),
    "JPCNN062": (0.962, 0.951, 0.916),
    "JPCNN047": (0.985, 0.922, 0.919),
}
MARGIN = 0.01


def _validation(configs: list[str]) -> dict[str, list[dict]]:
    """train.yaml's validation split (its datalist: dataset_dir, val_fraction, seed, fold as configured) of
    the shared data, by data set, in the split's order."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser["data_root"] = str(SHARED_DATA)
    by_set: dict[str, list[dict]] = {}
    for item in parser.get_parsed_content("datalist")["validation"]:
        by_set.setdefault(item["dataset"], []).append(item)
    return by_set


def _stem(path: str) -> str:
    return Path(path).name.split(".")[0]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _infer(input_dir: Path, output_dir: Path, *args: str, config_file: str = "bundle/configs/inference.yaml",
           env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--bundle_root", "bundle",
           "--config_file", config_file, "--input_dir", str(input_dir), "--output_dir", str(output_dir), *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(output_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(input_dir.rglob("*.png")))
    assert all(r["status"] == "ok" and not r["error"] for r in rows), rows


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def lung_inputs(tmp_path_factory) -> Path:
    """IN/<data set>/<stem>.png: the first N_PER_SET validation images of each data set, and CLEAN_SENSITIVE."""
    for name in LUNG_SETS:
        shared_dataset(name)
    validation = _validation(["train.yaml"])
    folder = tmp_path_factory.mktemp("lung_inputs")
    for name in LUNG_SETS:
        items = validation[name][:N_PER_SET]
        if name == "shenzhen":
            extra = [i for i in validation[name] if _stem(i["image"]) in CLEAN_SENSITIVE]
            assert len(extra) == len(CLEAN_SENSITIVE), "CLEAN_SENSITIVE must be validation images"
            items += extra
        (folder / name).mkdir()
        for item in items:
            shutil.copy(item["image"], folder / name)
    assert sorted(_stem(str(p)) for p in folder.rglob("*.png")) == sorted(LUNG_DICE)
    return folder


@pytest.fixture(scope="module")
def lung_masks(lung_inputs, tmp_path_factory) -> Path:
    """OUT of `run inference` with the shipped lung model and every default."""
    out = tmp_path_factory.mktemp("lung_out")
    _infer(lung_inputs, out)
    return out


def _expert_lungs(dataset: str, stem: str) -> np.ndarray:
    masks = "structures/lungs" if dataset == "jsrt_scr" else "masks"  # JSRT's masks/ is a label map 0..3
    return _read(SHARED_DATA / dataset / masks / f"{stem}.png") > 0


def test_shipped_lung_model_matches_the_experts_on_validation_images(lung_inputs, lung_masks):
    dice = {}
    for image in sorted(lung_inputs.rglob("*.png")):
        dataset, stem = image.parent.name, image.stem
        mask = _read(lung_masks / dataset / f"{stem}_seg.png")
        expert = _expert_lungs(dataset, stem)
        assert mask.shape == expert.shape and set(np.unique(mask)) <= {0, 1}, (stem, mask.shape, np.unique(mask))
        dice[stem] = _dice(mask == 1, expert)
    low = {s: round(d, 4) for s, d in dice.items() if d < LUNG_DICE[s] - MARGIN}
    assert not low, f"Dice below the measured value - {MARGIN}: {low} (all: {dice})"


def test_shipped_anatomy_model_matches_the_experts_per_structure(jsrt_scr, tmp_path):
    items = _validation(["train.yaml", "anatomy.yaml"])["jsrt_scr"][:N_ANATOMY]
    assert sorted(_stem(i["image"]) for i in items) == sorted(ANATOMY_DICE)
    (tmp_path / "in").mkdir()
    for item in items:
        shutil.copy(item["image"], tmp_path / "in")
    out = tmp_path / "out"
    _infer(tmp_path / "in", out, config_file="['bundle/configs/inference.yaml','bundle/configs/anatomy.yaml']")
    low = {}
    for stem, expected in ANATOMY_DICE.items():
        labels, expert = _read(out / f"{stem}_seg.png"), _read(jsrt_scr / "masks" / f"{stem}.png")
        assert labels.shape == expert.shape and set(np.unique(labels)) <= {0, 1, 2, 3}, (stem, np.unique(labels))
        for value, (structure, bar) in enumerate(zip(("lungs", "heart", "clavicles"), expected), start=1):
            dice = _dice(labels == value, expert == value)
            if dice < bar - MARGIN:
                low[stem, structure] = round(dice, 4)
    assert not low, f"Dice below the measured value - {MARGIN}: {low}"


def test_default_cpu_bf16_auto_agrees_with_float32(lung_inputs, lung_masks, tmp_path):
    """The default cpu_bf16 (auto: bfloat16 autocast where the CPU computes it natively) against --cpu_bf16 False
    (float32), end to end on the CPU (hidden GPUs: the switch acts on the CPU only): on a CPU with AVX-512 BF16
    or AMX bfloat16 moves a few boundary pixels (measured: 0 to 0.023 % of an image's pixels, 13 of the 14
    images differ at all); on one without, auto is float32 and nothing moves."""
    import torch

    from scripts.inferers import cpu_has_native_bf16

    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    default = lung_masks
    if torch.cuda.is_available():  # lung_masks ran on the GPU: run the default on the CPU here
        default = tmp_path / "auto"
        _infer(lung_inputs, default, env=hidden)
    fp32_out = tmp_path / "fp32"
    _infer(lung_inputs, fp32_out, "--cpu_bf16", "False", env=hidden)
    changed = {}
    for fp32_path in sorted(fp32_out.rglob("*_seg.png")):
        fp32, auto = _read(fp32_path), _read(default / fp32_path.relative_to(fp32_out))
        assert auto.shape == fp32.shape
        changed[fp32_path.name] = float((auto != fp32).mean())
        assert _dice(auto == 1, fp32 == 1) >= 0.995, fp32_path.name
    assert len(changed) == len(LUNG_DICE)
    assert max(changed.values()) <= 0.002, changed  # at most 0.2 % of the pixels of any image
    if cpu_has_native_bf16():
        assert sum(changed.values()) > 0, "no pixel changed: cpu_bf16 auto did not switch bfloat16 on"
    else:
        assert sum(changed.values()) == 0, "cpu_bf16 auto switched bfloat16 on a CPU without it"


def test_evaluating_with_eval_clean_scores_the_masks_inference_writes(lung_inputs, lung_masks, tmp_path):
    """`run evaluating --eval_clean True` (train.yaml + evaluate.yaml, the shipped model.pt) on a small Shenzhen
    folder: the metrics files, and for each scored image the Dice of the mask that folder inference wrote.
    Shenzhen's images are 256 x 256, the network's size, so both clean at the same size and must agree;
    raw scores differ on CLEAN_SENSITIVE (by 0.022 and 0.005, see there), one of which is scored."""
    from scripts.data import split_datalist

    data = tmp_path / "shenzhen"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for image in (lung_inputs / "shenzhen").iterdir():
        shutil.copy(image, data / "images")
        shutil.copy(SHARED_DATA / "shenzhen" / "masks" / image.name, data / "masks")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--bundle_root", "bundle",
           "--config_file", "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']",
           "--dataset_dir", str(data), "--output_dir", str(out), "--val_fraction", "0.5", "--eval_clean", "True"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Restored all variables from bundle/models/model.pt" in log

    eval_dir = out / "eval"
    with open(eval_dir / "metrics_per_image.csv") as f:
        rows = {_stem(r["image"]): r for r in csv.DictReader(f)}
    scored = [_stem(i["image"]) for i in split_datalist(str(data), val_fraction=0.5)["validation"]]
    assert sorted(rows) == sorted(scored) and len(scored) == 3
    assert set(scored) & set(CLEAN_SENSITIVE), scored
    for stem, row in rows.items():  # equal to 1e-7 on the CPU; 1e-3 leaves room for CUDA's kernels and AMP
        mask = _read(lung_masks / "shenzhen" / f"{stem}_seg.png") == 1
        assert float(row["lungs_dice"]) == pytest.approx(_dice(mask, _expert_lungs("shenzhen", stem)), abs=1e-3), stem
        assert (row["rows"], row["cols"], row["dataset"]) == ("256", "256", "shenzhen")
    with open(eval_dir / "metrics_summary.csv") as f:
        summary = {(s["dataset"], s["metric"]): s for s in csv.DictReader(f) if s["structure"] == "lungs"}
    assert summary["shenzhen", "dice"]["n"] == "3"
    assert float(summary["shenzhen", "dice"]["mean"]) == pytest.approx(
        np.mean([float(r["lungs_dice"]) for r in rows.values()]))
    assert "| lungs | 3 |" in (eval_dir / "metrics_summary.md").read_text()
    assert len(list((eval_dir / "overlays").glob("shenzhen_*.png"))) == 2  # best and worst
