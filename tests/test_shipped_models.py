"""The weights in bundle/models: `run evaluating` on the shared validation split reproduces the Dice that
metadata.json's `eval_metrics` (and the README's Results table) state for each of them."""

import csv
import json

import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE, SHARED_DATA, shared_dataset

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
