"""evaluate.yaml and scripts/evaluation.py: metrics at native resolution, reports, overlays, curves."""

import csv
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE, REPO

TRAIN = str(BUNDLE / "configs" / "train.yaml")
EVALUATE = str(BUNDLE / "configs" / "evaluate.yaml")


def _squares(k: int, size: int = 64, side: int = 20, top: int = 10, left: int = 10):
    """A square and the same square shifted k pixels to the right, as (1, H, W) masks."""
    a = np.zeros((1, size, size), np.uint8)
    b = np.zeros((1, size, size), np.uint8)
    a[0, top:top + side, left:left + side] = 1
    b[0, top:top + side, left + k:left + k + side] = 1
    return a, b


@pytest.mark.parametrize("k", [1, 3, 6])
def test_metrics_of_two_offset_squares(k):
    from scripts.evaluation import segmentation_metrics

    side = 20
    pred, ref = _squares(k, side=side)
    m = segmentation_metrics(pred, ref)
    assert m["dice"][0] == pytest.approx((side - k) / side)  # 2 * 20(20-k) / (2 * 400)
    assert m["iou"][0] == pytest.approx((side - k) / (side + k))  # 20(20-k) / (20(20+k))
    assert m["hd95"][0] == pytest.approx(k)  # a quarter of each outline (the leading side) is k px away
    assert 0 < m["assd"][0] < k
    # spacing is (rows, columns): the shift is along the columns, so only the column spacing counts
    mm = segmentation_metrics(pred, ref, spacing=(2.0, 0.5))
    assert mm["hd95"][0] == pytest.approx(0.5 * k)
    assert mm["assd"][0] < m["assd"][0]
    assert mm["dice"][0] == m["dice"][0]


def test_metrics_per_structure_keep_their_channel_and_handle_empty_masks():
    from scripts.evaluation import segmentation_metrics

    a1, b1 = _squares(2)
    a2, b2 = _squares(0, top=35)  # identical squares in the second channel
    pred = np.concatenate([a1, a2, np.zeros_like(a1)])  # third structure: nothing predicted
    ref = np.concatenate([b1, b2, b1])
    m = segmentation_metrics(torch.as_tensor(pred), torch.as_tensor(ref))
    assert m["dice"][:2] == pytest.approx([0.9, 1.0]) and m["dice"][2] == 0
    assert m["hd95"][:2] == pytest.approx([2.0, 0.0]) and m["assd"][1] == 0
    assert np.isnan(m["hd95"][2]) and np.isnan(m["assd"][2])  # distance undefined, not inf
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(pred, ref[:2])


@pytest.mark.parametrize("background_channel", [True, False])
def test_clean_structures_removes_islands_and_fills_holes_like_inference(background_channel):
    from scripts.evaluation import CleanStructuresd

    lungs = np.zeros((32, 32), np.float32)
    lungs[4:20, 2:12] = 1
    lungs[4:20, 18:28] = 1
    lungs[10, 6] = 0  # a hole
    lungs[28:30, 14:16] = 1  # a third, small island
    channels = [1 - lungs, lungs] if background_channel else [lungs]
    out = CleanStructuresd("pred", ["background", "lungs"], {"lungs": 2})({"pred": torch.tensor(np.stack(channels))})
    cleaned = out["pred"][-1].numpy()
    assert cleaned[10, 6] == 1 and cleaned[28:30, 14:16].sum() == 0
    assert cleaned.sum() == 2 * 16 * 10
    if background_channel:
        assert (out["pred"][0].numpy() == 1 - cleaned).all()


def test_report_scores_the_structure_channels_and_writes_the_files(tmp_path):
    """With a softmax model the output has a background channel first: the report must skip it."""
    from PIL import Image

    from monai.data import MetaTensor
    from scripts.evaluation import SegmentationReport

    image_path = tmp_path / "img.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(image_path)
    report = SegmentationReport(str(tmp_path / "eval"), ["lungs"], dataset_spacing={"jsrt_scr": [0.7, 0.7]})
    for k, dataset in ((2, "jsrt_scr"), (4, "jsrt_scr"), (1, "other")):
        pred, ref = _squares(k)
        onehot = lambda m: torch.as_tensor(np.concatenate([1 - m, m])).float()  # noqa: E731 (background, lungs)
        image = MetaTensor(torch.zeros(1, 16, 16), meta={"filename_or_obj": str(image_path), "spacing_known": False,
                                                         "original_affine": np.eye(3)})
        report.add({"pred": onehot(pred), "label": onehot(ref), "image": image}, {"dataset": dataset})
    rows = report.rows
    assert [r["lungs_dice"] for r in rows] == pytest.approx([0.9, 0.8, 0.95])  # not the background's Dice
    assert [r["distance_unit"] for r in rows] == ["mm", "mm", "px"]
    assert [r["lungs_hd95"] for r in rows] == pytest.approx([1.4, 2.8, 1.0])  # 0.7 mm pixels for jsrt_scr
    files = report.write()
    with open(files["per_image"]) as f:
        assert len(list(csv.DictReader(f))) == 3
    with open(files["summary"]) as f:
        summary = {(r["dataset"], r["metric"]): r for r in csv.DictReader(f) if r["structure"] == "lungs"}
    assert float(summary["jsrt_scr", "dice"]["mean"]) == pytest.approx(0.85)
    assert float(summary["jsrt_scr", "dice"]["sd"]) == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert summary["jsrt_scr", "hd95"]["unit"] == "mm" and summary["other", "hd95"]["unit"] == "px"
    assert float(summary["jsrt_scr", "dice"]["ci95_low"]) < 0.85 < float(summary["jsrt_scr", "dice"]["ci95_high"])
    assert "0.8500 ± 0.0707 (0.8500) [0.8000, 0.9000]" in files["markdown"].read_text()
    assert sorted(p.name for p in (tmp_path / "eval" / "overlays").iterdir()) == [
        "jsrt_scr_best_img.png", "jsrt_scr_worst_img.png", "other_best_img.png", "other_worst_img.png"]


def test_mean_ci95_agrees_with_the_normal_approximation():
    """For a roughly normal sample the bootstrap interval is close to mean ± 1.96 sd / sqrt(n)."""
    from scripts.evaluation import mean_ci95

    dice = np.random.default_rng(3).normal(0.94, 0.03, 60)
    low, high = mean_ci95(dice)
    assert low < dice.mean() < high
    assert (high - low) / 2 == pytest.approx(1.96 * dice.std(ddof=1) / np.sqrt(len(dice)), rel=0.15)
    assert mean_ci95(dice[:15])[1] - mean_ci95(dice[:15])[0] > high - low  # fewer images, wider interval
    assert mean_ci95(dice) == (low, high)  # seeded: the same table every run
    assert all(np.isnan(mean_ci95([0.9]))) and mean_ci95([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_training_curves_are_skipped_without_event_files(tmp_path, caplog):
    from scripts.evaluation import plot_training_curves

    with caplog.at_level(logging.INFO):
        assert plot_training_curves(tmp_path / "nothing_here", tmp_path / "curves.png") is None
    assert "training curves skipped" in caplog.text and not (tmp_path / "curves.png").exists()


def test_evaluate_cli_on_a_tiny_model_scores_at_native_size(tmp_path, small_montgomery):
    """Train 1 epoch at 64x64 on 8 Montgomery images, then `run evaluating` with the documented command."""
    from scripts.data import split_datalist

    out, ckpt = tmp_path / "out", tmp_path / "models"
    common = dict(dataset_dir=str(small_montgomery), output_dir=str(out), ckpt_dir=str(ckpt), spatial_size=[64, 64],
                  batch_size=4, progress=False)
    wf = ConfigWorkflow(config_file=TRAIN, workflow_type="train", bundle_root=str(BUNDLE), max_epochs=1, **common)
    wf.initialize()
    wf.run()
    wf.finalize()
    assert (ckpt / "model.pt").is_file()

    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--bundle_root", "bundle",
           "--config_file", f"['{TRAIN}','{EVALUATE}']"]
    for key, value in common.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"Restored all variables from {ckpt / 'model.pt'}" in log

    eval_dir = out / "eval"
    with open(eval_dir / "metrics_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    validation = split_datalist(str(small_montgomery))["validation"]  # the training run's seeded split
    assert sorted(r["image"] for r in rows) == sorted(item["image"] for item in validation)
    for r in rows:
        assert (r["rows"], r["cols"]) == ("256", "256")  # the mask's native size, not the network's 64x64
        assert r["dataset"] == small_montgomery.name and r["distance_unit"] == "px"
        assert 0 <= float(r["lungs_dice"]) <= 1 and 0 <= float(r["lungs_iou"]) <= float(r["lungs_dice"])
        assert float(r["lungs_hd95"]) >= 0 and float(r["lungs_assd"]) >= 0
    # the evaluator's own MeanDice handler saw the same native-size arrays as the report
    logged = float(re.search(r"val_mean_dice: ([0-9.]+)", log).group(1))
    assert np.mean([float(r["lungs_dice"]) for r in rows]) == pytest.approx(logged, abs=1e-4)

    with open(eval_dir / "metrics_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {(s["dataset"], s["structure"], s["metric"]) for s in summary} == {
        (small_montgomery.name, "lungs", m) for m in ("dice", "iou", "hd95", "assd")}
    assert "| lungs | 2 |" in (eval_dir / "metrics_summary.md").read_text()
    overlays = sorted(p.name for p in (eval_dir / "overlays").iterdir())
    assert len(overlays) == 2 and overlays[0].startswith(f"{small_montgomery.name}_best_")
    from PIL import Image

    for png in [*(eval_dir / "overlays").iterdir(), eval_dir / "training_curves.png"]:
        with Image.open(png) as im:
            assert im.width > 200 and im.height > 200


@pytest.mark.parametrize("clean", [True, False])
def test_eval_clean_adds_the_clean_up_to_the_post_processing(clean):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([TRAIN, EVALUATE])
    parser["eval_clean"] = clean
    names = [type(t).__name__ for t in parser.get_parsed_content("validate#postprocessing").transforms]
    assert ("CleanStructuresd" in names) == clean and names[0] == "NativeResolutiond"


def test_report_compares_the_cardiothoracic_ratio_of_model_and_expert(tmp_path):
    """Anatomy structures (sigmoid channels lungs, heart, clavicles): the CTR from the prediction and the label."""
    from monai.data import MetaTensor
    from scripts.evaluation import SegmentationReport

    def structures(heart_cols):
        m = np.zeros((3, 100, 120), np.float32)
        m[0, 10:90, 10:50] = m[0, 10:90, 70:110] = 1  # lungs: thorax columns 10..109, 100 px wide
        m[1, 50:85, heart_cols[0]:heart_cols[1]] = 1  # heart
        m[2, 5:15, 20:100] = 1  # clavicles
        return torch.as_tensor(m)

    report = SegmentationReport(str(tmp_path / "eval"), ["lungs", "heart", "clavicles"], overlays=False)
    image = MetaTensor(torch.zeros(1, 100, 120), meta={"spacing_known": False, "original_affine": np.eye(3)})
    for pred_cols, label_cols in (((35, 85), (40, 85)), ((40, 90), (40, 90))):  # heart 50 vs 45 px; 50 vs 50
        report.add({"pred": structures(pred_cols), "label": structures(label_cols), "image": image},
                   {"dataset": "jsrt_scr"})
    assert [r["ctr_pred"] for r in report.rows] == pytest.approx([0.50, 0.50])
    assert [r["ctr_label"] for r in report.rows] == pytest.approx([0.45, 0.50])
    assert [r["ctr_abs_error"] for r in report.rows] == pytest.approx([0.05, 0.0])
    files = report.write()
    with open(files["summary"]) as f:
        ctr = {r["metric"]: r for r in csv.DictReader(f) if r["structure"] == "cardiothoracic_ratio"}
    assert float(ctr["abs_error"]["mean"]) == pytest.approx(0.025) and ctr["abs_error"]["n"] == "2"
    assert "|model - expert| 0.025" in files["markdown"].read_text()
    with open(files["per_image"]) as f:
        assert list(csv.DictReader(f))[0]["ctr_label"] == "0.45"


def test_cross_validation_folds_pool_into_one_evaluation(tmp_path, small_montgomery):
    """Two folds (val_fraction 0.5) trained and evaluated apart, then `run summarizing_folds`: every image once."""
    common = dict(dataset_dir=str(small_montgomery), spatial_size=[64, 64], batch_size=4, progress=False,
                  val_fraction=0.5, eval_overlays=False)
    fold_rows = []
    for fold in (0, 1):
        out = tmp_path / f"fold{fold}"
        settings = dict(common, fold=fold, output_dir=str(out), ckpt_dir=str(out / "models"))
        for config, run_id in ((TRAIN, "run"), ([TRAIN, EVALUATE], "evaluating")):
            wf = ConfigWorkflow(config_file=config, workflow_type=None, run_id=run_id, bundle_root=str(BUNDLE),
                                max_epochs=1, **settings)
            wf.initialize()
            wf.run()
            wf.finalize()
        with open(out / "eval" / "metrics_per_image.csv") as f:
            fold_rows.append(list(csv.DictReader(f)))
    assert not {r["image"] for r in fold_rows[0]} & {r["image"] for r in fold_rows[1]}

    eval_dirs = [str(tmp_path / f"fold{k}" / "eval") for k in (0, 1)]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "summarizing_folds", "--bundle_root", "bundle",
           "--config_file", f"['{TRAIN}','{EVALUATE}']", "--fold_eval_dirs", str(eval_dirs).replace(" ", ""),
           "--output_dir", str(tmp_path / "crossval")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    pooled_dir = tmp_path / "crossval" / "eval"
    with open(pooled_dir / "metrics_per_image.csv") as f:
        pooled = list(csv.DictReader(f))
    assert sorted(r["image"] for r in pooled) == sorted(str(p) for p in (small_montgomery / "images").iterdir())
    for fold, rows in enumerate(fold_rows):  # each image keeps the scores of the fold that validated it
        mine = [r for r in pooled if r["fold_dir"] == eval_dirs[fold]]
        assert [{k: v for k, v in r.items() if k != "fold_dir"} for r in mine] == rows
    with open(pooled_dir / "metrics_summary.csv") as f:
        dice = next(s for s in csv.DictReader(f) if (s["structure"], s["metric"]) == ("lungs", "dice"))
    assert int(dice["n"]) == 8
    assert float(dice["mean"]) == pytest.approx(np.mean([float(r["lungs_dice"]) for r in pooled]))
    assert "| lungs | 8 |" in (pooled_dir / "metrics_summary.md").read_text()
    with open(pooled_dir / "metrics_by_fold.csv") as f:
        by_fold = [s for s in csv.DictReader(f) if (s["structure"], s["metric"]) == ("lungs", "dice")]
    assert [s["fold_dir"] for s in by_fold] == eval_dirs
    for s, rows in zip(by_fold, fold_rows):
        assert float(s["mean"]) == pytest.approx(np.mean([float(r["lungs_dice"]) for r in rows]))


# the columns of a lung model's metrics_per_image.csv, for tables written by hand
PER_IMAGE_HEADER = ("image,label,dataset,rows,cols,spacing,distance_unit,mean_dice,"
                    "lungs_dice,lungs_iou,lungs_hd95,lungs_assd\n")


def test_summarize_folds_names_the_missing_or_overlapping_fold(tmp_path):
    from scripts.evaluation import summarize_folds

    for fold, images in (("a", ["x.png", "y.png"]), ("b", ["y.png"])):
        (tmp_path / fold).mkdir()
        (tmp_path / fold / "metrics_per_image.csv").write_text(
            PER_IMAGE_HEADER + "".join(f"{i},m/{i},set,8,8,,px,0.9,0.9,0.8,1.0,0.5\n" for i in images))
    with pytest.raises(FileNotFoundError, match=r"missing[/\\]metrics_per_image.csv"):
        summarize_folds([tmp_path / "a", tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(ValueError, match=r"y.png is scored in .*a.* and in .*b"):
        summarize_folds([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    files = summarize_folds([tmp_path / "a"], tmp_path / "out")
    assert "| lungs | 2 |" in files["markdown"].read_text()


def test_summarize_folds_tables_the_mean_dice_of_each_fold(tmp_path):
    """metrics_by_fold.csv and the summary's per-fold table: each fold's own mean, then their mean and sd."""
    from scripts.evaluation import summarize_folds

    for fold, dices in (("fold0", [0.90, 0.96]), ("fold1", [0.97, 0.99])):
        (tmp_path / fold / "eval").mkdir(parents=True)
        (tmp_path / fold / "eval" / "metrics_per_image.csv").write_text(PER_IMAGE_HEADER + "".join(
            f"{fold}_{i}.png,m/{fold}_{i}.png,set,8,8,,px,{d},{d},0.8,1.0,0.5\n" for i, d in enumerate(dices)))
    files = summarize_folds([tmp_path / "fold0" / "eval", tmp_path / "fold1" / "eval"], tmp_path / "out")
    with open(files["by_fold"]) as f:
        dice = {s["fold_dir"]: float(s["mean"]) for s in csv.DictReader(f) if s["metric"] == "dice"}
    assert list(dice.values()) == pytest.approx([0.93, 0.98])
    markdown = files["markdown"].read_text()
    assert "| data set | structure | fold0 | fold1 | mean | sd |" in markdown
    assert f"| set | lungs | 0.9300 | 0.9800 | 0.9550 | {np.std([0.93, 0.98], ddof=1):.4f} |" in markdown
