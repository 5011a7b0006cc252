"""The weights in bundle/models: `run evaluating` on the shared validation split reproduces the Dice that
metadata.json's `eval_metrics` (and the README's Results table) state for each of them; and the lung model
gives one mask for a real radiograph whether it comes as PNG or as DICOM."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from conftest import BUNDLE, REPO, SHARED_DATA, shared_dataset
from dicom_fixtures import write_dicom

CONFIGS = BUNDLE / "configs"
META = json.loads((CONFIGS / "metadata.json").read_text())["eval_metrics"]

# weights file, configs merged before evaluate.yaml, overrides, {(dataset, structure): eval_metrics key}
SHIPPED = {
    "lungs UNet": ("model.pt", ["train.yaml"], {}, {
        ("jsrt_scr", "lungs"): "val_dice_lungs_jsrt",
        ("montgomery", "lungs"): "val_dice_lungs_montgomery",
        ("shenzhen", "lungs"): "val_dice_lungs_shenzhen"}),
    "anatomy UNet": ("model_anatomy.pt", ["train.yaml", "anatomy.yaml"], {}, {
        ("jsrt_scr", s): f"anatomy_val_dice_{s}" for s in ("lungs", "heart", "clavicles")}),
    "anatomy InvertedNet": ("model_anatomy_invertednet.pt", ["train.yaml", "anatomy.yaml", "invertednet.yaml"],
                            {"spatial_size": [128, 128]}, {
        ("jsrt_scr", s): f"anatomy_invertednet_128_val_dice_{s}" for s in ("lungs", "heart", "clavicles")}),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_reproduce_their_eval_metrics(name, tmp_path):
    model_file, configs, overrides, expected = SHIPPED[name]
    for dataset in {d for d, _ in expected}:
        shared_dataset(dataset)
    weights = BUNDLE / "models" / model_file
    assert weights.is_file(), f"{weights} is missing"
    torch.load(weights, map_location="cpu", weights_only=True)  # a plain state dict, no code

    ev = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in [*configs, "evaluate.yaml"]], workflow_type=None,
        run_id="evaluating", bundle_root=str(BUNDLE), data_root=str(SHARED_DATA), model_file=model_file,
        output_dir=str(tmp_path), eval_overlays=False, progress=False, **overrides)
    ev.initialize()
    ev.run()
    ev.finalize()
    with open(tmp_path / "eval" / "metrics_summary.csv") as f:
        dice = {(r["dataset"], r["structure"]): float(r["mean"]) for r in csv.DictReader(f) if r["metric"] == "dice"}
    for key, meta_key in expected.items():
        assert dice[key] == pytest.approx(META[meta_key], abs=2e-3), f"{name}, {key}: Dice {dice[key]:.4f}"


def test_shipped_lung_model_gives_one_mask_for_png_and_dicom(montgomery, tmp_path):
    """A user's folder: one real radiograph as PNG and as a 12-bit MONOCHROME1 DICOM with rescale and window.
    The shipped model gives the same mask for both, and it matches the expert's outline. The radiograph is
    a validation image of train.yaml's split (its datalist: val_fraction, seed and fold as configured),
    which the shipped model did not train on."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser["dataset_dir"] = str(montgomery)  # each folder is split on its own: as in the training run
    name = Path(parser.get_parsed_content("datalist")["validation"][0]["image"]).name
    pixels = np.asarray(Image.open(montgomery / "images" / name)).astype(np.uint16)
    expert = np.asarray(Image.open(montgomery / "masks" / name)) > 0
    (tmp_path / "in").mkdir()
    Image.open(montgomery / "images" / name).save(tmp_path / "in" / "study.png")
    # MONOCHROME1 (low stored values are bright), 12 bits; the modality LUT maps them to 0.5 * stored + 100
    stored = 4085 - pixels * 16
    write_dicom(tmp_path / "in" / "study_dx", stored, bits_stored=12, monochrome1=True, sop_class="CR",
                rescale=(0.5, 100.0), window=(1124.0, 2100.0))  # the window holds every value: linear
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--bundle_root", "bundle",
           "--config_file", "bundle/configs/inference.yaml", "--input_dir", str(tmp_path / "in"),
           "--output_dir", str(out), "--progress", "False", "--num_workers", "0"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    png_mask = np.asarray(Image.open(out / "study_seg.png"))
    dicom_mask = np.asarray(Image.open(out / "study_dx_seg.png"))
    np.testing.assert_array_equal(dicom_mask, png_mask)
    lungs = png_mask == 1
    dice = 2 * (lungs & expert).sum() / (lungs.sum() + expert.sum())
    assert dice >= 0.95, f"{name}: Dice {dice:.3f} against the expert mask"
