"""anatomy.yaml and scripts/anatomy.py: lungs, heart and clavicles as overlapping sigmoid channels."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE

CONFIGS = BUNDLE / "configs"
TRAIN_ANATOMY = [str(CONFIGS / "train.yaml"), str(CONFIGS / "anatomy.yaml")]


def _read(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def test_structures_to_label_map_gives_the_higher_label_on_overlaps():
    from monai.data import MetaTensor
    from scripts.anatomy import StructuresToLabelMapd, structures_to_label_map

    masks = np.zeros((3, 4, 4), np.float32)
    masks[0, :, :3] = 1  # lungs
    masks[1, 2:, 1:] = 0.9  # heart (probabilities work too)
    masks[2, 0, :2] = 1  # clavicles, over the lungs
    expected = np.array([[3, 3, 1, 0], [1, 1, 1, 0], [1, 2, 2, 2], [1, 2, 2, 2]])
    out = structures_to_label_map(masks)
    assert isinstance(out, np.ndarray) and out.shape == (1, 4, 4) and (out[0] == expected).all()
    tensor = structures_to_label_map(MetaTensor(torch.as_tensor(masks)))
    assert isinstance(tensor, MetaTensor) and (tensor[0].numpy() == expected).all()
    d = StructuresToLabelMapd(keys="pred")({"pred": torch.as_tensor(masks)})
    assert (d["pred"][0].numpy() == expected).all()


def test_select_channel_keeps_one_structure():
    from scripts.anatomy import SelectChannel

    output = [{"pred": torch.arange(3.0)[:, None, None] * torch.ones(3, 2, 2), "label": torch.ones(3, 2, 2)}] * 2
    preds, labels = SelectChannel(1)(output)
    assert len(preds) == 2 and preds[0].shape == (1, 2, 2) and labels[1].shape == (1, 2, 2)
    assert float(preds[0].max()) == 1.0  # channel 1 of the prediction


def test_anatomy_config_parses_and_the_label_keeps_the_overlaps(tmp_path, jsrt_scr):
    wf = ConfigWorkflow(config_file=TRAIN_ANATOMY, workflow_type="train", bundle_root=str(BUNDLE),
                        data_root=str(jsrt_scr.parent), output_dir=str(tmp_path / "out"),
                        ckpt_dir=str(tmp_path / "ckpt"),
                        spatial_size=[512, 512], cache_rate=0.0, progress=False)
    wf.initialize()
    assert not wf.check_properties()
    p = wf.parser
    assert p.get_parsed_content("num_classes") == 3 and p.get_parsed_content("network_def").out_channels == 3
    assert p.get_parsed_content("model_file") == "model_anatomy.pt"
    assert p.get_parsed_content("class_names") == ["background", "lungs", "heart", "clavicles"]
    dice_loss = p.get_parsed_content("loss").dice
    assert dice_loss.sigmoid and not dice_loss.softmax and not dice_loss.to_onehot_y
    per_structure = {"val_dice_lungs", "val_dice_heart", "val_dice_clavicles"}
    assert per_structure <= set(p.get_parsed_content("validate#additional_metrics"))

    sample = p.get_parsed_content("validate#dataset")[0]  # at 512x512, JSRT's own size: no resampling
    label = sample["label"]
    assert tuple(label.shape) == (3, 512, 512) and set(label.unique().tolist()) <= {0, 1}
    assert sample["dataset"] == "jsrt_scr"
    stem = Path(sample["image"].meta["filename_or_obj"]).name
    lungs, heart, clavicles = (_read(jsrt_scr / "structures" / s / stem) > 0 for s in ("lungs", "heart", "clavicles"))
    rows, cols = np.nonzero(lungs & clavicles)
    assert len(rows) > 100  # SCR outlines the clavicles over the lung fields
    r, c = rows[len(rows) // 2], cols[len(cols) // 2]
    assert label[0, r, c] == 1 and label[2, r, c] == 1  # in both channels
    assert _read(jsrt_scr / "masks" / stem)[r, c] == 3  # ... where the label map keeps only the clavicle
    assert (label.numpy().astype(bool) == np.stack([lungs, heart, clavicles])).all()

    # the inference side's conversion gives back the data set's label map exactly
    from scripts.anatomy import structures_to_label_map

    assert (structures_to_label_map(label)[0].numpy() == _read(jsrt_scr / "masks" / stem)).all()


def _small_jsrt(jsrt_scr: Path, out: Path, n: int = 8) -> Path:
    subs = ["images", "masks", "structures/lungs", "structures/heart", "structures/clavicles"]
    for sub in subs:
        (out / sub).mkdir(parents=True)
    for image in sorted((jsrt_scr / "images").glob("*.png"))[:n]:
        for sub in subs:
            shutil.copy(jsrt_scr / sub / image.name, out / sub / image.name)
    return out


def test_anatomy_tiny_training_writes_its_model_and_evaluates_per_structure(tmp_path, jsrt_scr):
    data = _small_jsrt(jsrt_scr, tmp_path / "data" / "jsrt_scr")  # named jsrt_scr: its known 0.7 mm spacing applies
    common = dict(bundle_root=str(BUNDLE), dataset_dir=str(data), output_dir=str(tmp_path / "out"),
                  ckpt_dir=str(tmp_path / "models"), spatial_size=[64, 64], batch_size=4, progress=False)
    wf = ConfigWorkflow(config_file=TRAIN_ANATOMY, workflow_type="train", max_epochs=1, **common)
    wf.initialize()
    wf.run()
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    wf.finalize()
    assert {"val_mean_dice", "val_dice_lungs", "val_dice_heart", "val_dice_clavicles"} <= set(metrics)
    assert metrics["val_mean_dice"] == pytest.approx(
        np.mean([metrics[f"val_dice_{s}"] for s in ("lungs", "heart", "clavicles")]), abs=1e-5)
    model = tmp_path / "models" / "model_anatomy.pt"
    assert model.is_file() and not (tmp_path / "models" / "model.pt").exists()
    state = torch.load(model, map_location="cpu", weights_only=True)
    assert [v.shape[0] for k, v in state.items() if k.endswith("bias")][-1] == 3  # three output channels

    ev = ConfigWorkflow(config_file=[*TRAIN_ANATOMY, str(CONFIGS / "evaluate.yaml")], workflow_type=None,
                        run_id="evaluating", **common)
    ev.initialize()
    ev.run()
    ev.finalize()
    eval_dir = tmp_path / "out" / "eval"
    with open(eval_dir / "metrics_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # 20 % of 8
    for r in rows:
        assert (r["rows"], r["cols"], r["distance_unit"], r["spacing"]) == ("512", "512", "mm", "0.7 0.7")
        for s in ("lungs", "heart", "clavicles"):
            assert 0 <= float(r[f"{s}_dice"]) <= 1 and f"{s}_hd95" in r and f"{s}_assd" in r
    assert len(list((eval_dir / "overlays").glob("jsrt_scr_*.png"))) == 2


def test_anatomy_loss_fits_overlapping_structures():
    """A prediction equal to a multi-label target (a pixel in lungs and clavicles) must cost almost nothing;
    a softmax cross-entropy across the channels (DiceCELoss with 3 channels) cannot get there."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "anatomy.yaml")])
    loss = parser.get_parsed_content("loss")
    target = torch.zeros(1, 3, 16, 16)
    target[:, 0, 2:14, 2:8] = 1  # lungs
    target[:, 1, 6:12, 8:12] = 1  # heart
    target[:, 2, 2:4, 2:8] = 1  # clavicles, inside the lungs
    logits = target * 20 - 10
    assert float(loss(logits, target)) < 0.01
    assert float(loss(-logits, target)) > 1.0
