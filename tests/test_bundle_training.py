"""The training config through MONAI's bundle machinery: parsing, the CLI, resuming, and learning."""

import os
import subprocess
import sys
import time

import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE, REPO

TRAIN = str(BUNDLE / "configs" / "train.yaml")


def _workflow(tmp_path, **override):
    return ConfigWorkflow(
        config_file=TRAIN,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "ckpt"),
        progress=False,
        **override,
    )


def test_train_config_has_zoo_properties_and_overrides_reach_the_transforms(tmp_path, small_montgomery):
    wf = _workflow(tmp_path, dataset_dir=str(small_montgomery), spatial_size=[96, 64], num_classes=3,
                   opacity_prob=0.4, opacity_radius=[0.1, 0.3])
    wf.initialize()
    assert not wf.check_properties()  # every required train property of MONAI's spec is present
    # reproducible by default (deterministic: true, cudnn_benchmark: false)
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    parser = wf.parser
    assert parser.get_parsed_content("device").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parser.get_parsed_content("cache_on_device") is torch.cuda.is_available()  # GPU-resident cache on CUDA
    resize = [t for t in parser.get_parsed_content("train#preprocessing").transforms if type(t).__name__ == "Resized"]
    assert tuple(resize[0].resizer.spatial_size) == (96, 64)
    opacity = [t for t in parser.get_parsed_content("train#preprocessing").transforms
               if type(t).__name__ == "RandLungOpacityd"]
    assert opacity[0].prob == 0.4 and opacity[0].radius_range == (0.1, 0.3)
    assert parser.get_parsed_content("network_def").out_channels == 3
    sample = parser.get_parsed_content("validate#dataset")[0]
    assert tuple(sample["image"].shape) == (1, 96, 64)
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert set(sample["label"].unique().tolist()) <= {0, 1}
    assert len(parser.get_parsed_content("datalist")["validation"]) == 2  # 20 % of 8


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for name in os.listdir(log_dir):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(str(log_dir / name))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    return tags


def _cli(*args, cwd=REPO):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", "bundle",
           "--config_file", "bundle/configs/train.yaml", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_trains_one_epoch_writes_checkpoint_and_events_then_resumes(tmp_path, small_montgomery):
    out, ckpt = tmp_path / "tb", tmp_path / "models"
    args = ["--dataset_dir", str(small_montgomery), "--output_dir", str(out), "--ckpt_dir", str(ckpt),
            "--spatial_size", "[64,64]", "--batch_size", "4", "--progress", "False"]
    first = _cli(*args, "--max_epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_epoch=1.pt").is_file()
    assert {"train_loss", "val_mean_dice", "val_mean_iou"} <= _events(out)

    # model.pt is a plain state dict that loads without executing code and fits the network; both files hold
    # CPU tensors only (on a GPU machine too), so they load anywhere without a map_location
    for name in ("model.pt", "checkpoint_epoch=1.pt"):
        tags = set()
        torch.load(ckpt / name, map_location=lambda storage, tag: tags.add(tag) or storage, weights_only=True)
        assert tags == {"cpu"}, (name, tags)
    state = torch.load(ckpt / "model.pt", weights_only=True)
    from monai.networks.nets import UNet

    UNet(2, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).load_state_dict(state)

    second = _cli(*args, "--max_epochs", "2", "--resume", "True")
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"Restored all variables from {ckpt / 'checkpoint_epoch=1.pt'}" in log
    assert "Epoch[1]" not in log and "Epoch[2] Complete" in log  # only the missing epoch ran
    assert (ckpt / "checkpoint_epoch=2.pt").is_file()


def test_best_model_saver_keeps_its_record_across_a_resume(tmp_path):
    from ignite.engine import Engine

    from scripts.handlers import BestModelSaver

    net = torch.nn.Linear(2, 2)

    def run_with(score, saver):
        engine = Engine(lambda e, b: None)
        saver.attach(engine)
        engine.state.metrics = {"val_mean_dice": score}
        engine.state.epoch = 1
        saver.metrics_completed(engine)

    def saved_weight():
        return torch.load(tmp_path / "model.pt", weights_only=True)["weight"]

    first = BestModelSaver(str(tmp_path), {"model": net}, key_metric_name="val_mean_dice")
    with torch.no_grad():
        net.weight.fill_(1.0)
    run_with(0.9, first)
    torch.testing.assert_close(saved_weight(), torch.full((2, 2), 1.0), rtol=0, atol=0)
    resumed = BestModelSaver(str(tmp_path), {"model": net}, key_metric_name="val_mean_dice")
    resumed.load_state_dict(first.state_dict())
    with torch.no_grad():
        net.weight.fill_(2.0)
    run_with(0.5, resumed)  # worse: model.pt must keep the weights of the 0.9 epoch
    torch.testing.assert_close(saved_weight(), torch.full((2, 2), 1.0), rtol=0, atol=0)
    run_with(0.95, resumed)  # better: replaced by the current weights
    torch.testing.assert_close(saved_weight(), torch.full((2, 2), 2.0), rtol=0, atol=0)


def test_cli_names_the_file_without_a_mask(tmp_path, small_montgomery):
    victim = sorted((small_montgomery / "masks").iterdir())[3]
    victim.unlink()
    result = _cli("--dataset_dir", str(small_montgomery), "--output_dir", str(tmp_path), "--ckpt_dir",
                  str(tmp_path), "--max_epochs", "1")
    assert result.returncode != 0
    assert f"{small_montgomery / 'images' / victim.name}: no mask for this image" in result.stderr


@pytest.mark.slow
def test_training_learns_montgomery_lungs(tmp_path, montgomery):
    """A pipeline that runs but does not learn fails here: validation Dice >= 0.89 at 128x128 after 12 epochs.

    Measured on 2 CPU cores (best validation Dice after 12 epochs): seed 0, this test's, 0.9076 in a pytest
    run of four test files, 0.9099 alone, 0.9097 alone on one thread; seeds 1 to 4 (other splits,
    initialisations and augmentation draws) 0.9191, 0.9259, 0.9009, 0.9172. The bar sits just under the
    lowest of the five (after the first epoch they were 0.52 to 0.82)."""
    start = time.perf_counter()
    wf = _workflow(tmp_path, dataset_dir=str(montgomery), spatial_size=[128, 128], max_epochs=12, batch_size=8)
    wf.initialize()
    wf.run()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    best = evaluator.state.best_metric
    wf.finalize()
    print(f"\nlearning test: best validation Dice {best:.4f} after 12 epochs, {time.perf_counter() - start:.0f} s")
    assert best >= 0.89


def test_pretrained_weights_are_the_starting_point(tmp_path, small_montgomery):
    """`pretrained` loads a model.pt before the first step: with a learning rate of 0 the best model
    saved after one epoch is exactly those weights (a fresh network would be seeded noise)."""
    shipped = BUNDLE / "models" / "model.pt"
    wf = _workflow(tmp_path, dataset_dir=str(small_montgomery), spatial_size=[64, 64], batch_size=4,
                   max_epochs=1, learning_rate=0.0, pretrained=str(shipped))
    wf.initialize()
    wf.run()
    wf.finalize()
    saved = torch.load(tmp_path / "ckpt" / "model.pt", map_location="cpu", weights_only=True)
    expected = torch.load(shipped, map_location="cpu", weights_only=True)
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)
