"""Directory inference (configs/inference.yaml): inputs of every kind, broken files, outputs and measures.

The network is a freshly initialised UNet saved in tmp (seeded), so the masks are arbitrary but
deterministic: the tests compare masks of the same pixels read through different formats, and check
the files, the CSV and the DICOM SEG; the measures are tested on synthetic masks whose areas are known.
"""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLE, REPO
from dicom_fixtures import write_broken_files, write_dicom

INFER = str(BUNDLE / "configs" / "inference.yaml")
TRAIN = str(BUNDLE / "configs" / "train.yaml")
ANATOMY = ["background", "lungs", "heart", "clavicles"]


def _weights(path: Path, num_classes: int = 2, seed: int = 0) -> Path:
    """A freshly initialised UNet of train.yaml's shape, saved as a plain state dict."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(2, 1, num_classes, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    torch.save(net.state_dict(), path)
    return path


def _mask(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _rows(csv_path) -> dict[str, dict]:
    with open(csv_path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def _cause(exc: BaseException, kind: type) -> str:
    """The message of the first ``kind`` in an exception's chain (MONAI wraps errors of `run` expressions
    in ``RuntimeError("Failed to evaluate ConfigExpression ...")``)."""
    while exc is not None:
        if type(exc) is kind and not str(exc).startswith("Failed to evaluate"):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return ""


def _workflow(tmp_path, **override):
    from monai.bundle import ConfigWorkflow

    config_file = override.pop("config_file", INFER)
    settings = dict(bundle_root=str(BUNDLE), output_dir=str(tmp_path / "out"), progress=False, num_workers=0)
    settings.update(override)
    return ConfigWorkflow(config_file=config_file, workflow_type="inference", **settings)


# ---- measures and post-processing on synthetic masks ---------------------------------------------


def test_measures_areas_sides_spacing_and_ctr():
    from scripts.measures import csv_columns, measure

    labels = np.zeros((100, 120), dtype=np.uint8)
    labels[20:80, 10:50] = 1  # image left = patient's right lung: 60 x 40 = 2400 px
    labels[25:75, 70:110] = 1  # image right = patient's left lung: 50 x 40 = 2000 px
    labels[50:85, 40:80] = 2  # heart over the lungs' inner parts: 40 px wide
    names = ANATOMY
    m = measure(labels, names, spacing=(0.5, 0.25))
    right, left = 2400 - 30 * 10, 2000 - 25 * 10  # the heart took 10 columns of each lung's lower rows
    assert (m["right_lung_area_px"], m["left_lung_area_px"]) == (right, left)
    assert m["lung_area_px"] == right + left and m["n_lung_components"] == 2
    assert m["lung_area_cm2"] == pytest.approx((right + left) * 0.5 * 0.25 / 100)
    assert m["heart_area_px"] == 35 * 40 and m["heart_area_cm2"] == pytest.approx(1400 * 0.125 / 100)
    assert m["clavicles_area_px"] == 0
    assert m["cardiothoracic_ratio"] == pytest.approx(40 / 100)  # heart 40 px / thorax columns 10..109
    assert m["qc_flags"] == []
    assert csv_columns(names) == [
        "path", "status", "error", "warnings", "mask", "rows", "columns", "spacing_mm", "lung_area_px", "lung_area_cm2",
        "right_lung_area_px", "left_lung_area_px", "n_lung_components", "heart_area_px", "heart_area_cm2",
        "clavicles_area_px", "clavicles_area_cm2", "cardiothoracic_ratio", "qc_score", "qc_flags"]
    assert "heart_area_px" not in csv_columns(["background", "lungs"])

    no_spacing = measure(labels, ["background", "lungs"], spacing=None)
    assert no_spacing["lung_area_cm2"] is None and "cardiothoracic_ratio" not in no_spacing


def test_measures_qc_flags_and_side_of_single_or_merged_lungs():
    from scripts.measures import measure, split_lungs

    one = np.zeros((100, 100), dtype=np.uint8)
    one[20:80, 60:90] = 1  # one lung, on the image right: the patient's left lung
    m = measure(one, ["background", "lungs"], None)
    assert (m["right_lung_area_px"], m["left_lung_area_px"]) == (0, 1800)
    assert "lung_components!=2" in m["qc_flags"] and "right_left_ratio_out_of_range" in m["qc_flags"]

    merged = np.zeros((100, 100), dtype=np.uint8)
    merged[20:80, 10:90] = 1  # both lungs as one blob across the midline (fraction 0.48: in range)
    right, left, n = split_lungs(merged.astype(bool))
    assert n == 1 and right.sum() == left.sum() == 60 * 40 and not (right & left).any()
    assert measure(merged, ["background", "lungs"], None)["qc_flags"] == ["lung_components!=2"]
    # the counts measure() takes are the pixels of split_lungs' masks, whatever the blobs
    import cv2

    from scripts.measures import lung_side_areas

    for seed in range(4):
        blobs = cv2.GaussianBlur(np.random.default_rng(seed).normal(size=(90, 120)), (0, 0), 3) > 0.05
        right, left, n = split_lungs(blobs)
        assert lung_side_areas(blobs) == (int(right.sum()), int(left.sum()), n) and n > 2
        assert not (right & left).any() and ((right | left) == blobs).all()

    tiny = np.zeros((100, 100), dtype=np.uint8)
    tiny[40:45, 10:15] = tiny[40:45, 80:85] = 1
    assert "lung_area_fraction_out_of_range" in measure(tiny, ["background", "lungs"], None)["qc_flags"]

    empty = measure(np.zeros((10, 10), np.uint8), ANATOMY, None)
    assert empty["lung_area_px"] == 0 and empty["cardiothoracic_ratio"] is None
    assert {"lung_components!=2", "lung_area_fraction_out_of_range", "heart_missing"} <= set(empty["qc_flags"])


def test_clean_labels_keeps_largest_components_per_class_and_fills_holes():
    from scripts.postprocessing import clean_labels

    labels = np.zeros((60, 60), dtype=np.uint8)
    labels[5:40, 5:25] = labels[5:40, 35:55] = 1  # two lungs
    labels[50:53, 5:8] = 1  # a speck of "lung": removed (lungs keep 2)
    labels[15:18, 10:13] = 0  # a hole in a lung: filled
    labels[20:23, 40:43] = 3  # another class inside a lung: left as it is
    labels[45:58, 30:45] = 2  # the heart
    labels[55:57, 55:57] = 2  # a heart fragment: removed (heart keeps 1)
    out = clean_labels(labels, ANATOMY, {"lungs": 2, "heart": 1}, fill_holes=True)
    assert out[51, 6] == 0 and out[16, 11] == 1 and out[21, 41] == 3 and out[56, 56] == 0
    assert (out == 1).sum() == 2 * 35 * 20 - 9
    kept = clean_labels(labels, ANATOMY, {}, fill_holes=False)
    np.testing.assert_array_equal(kept, labels)


def test_decision_at_network_size_is_cleaned_and_brought_to_native_size():
    from scripts.postprocessing import DecideAtNetworkSized, ResizeDecisiond

    # softmax: 2 channels for [background, lungs]; two lungs, a stray fragment and a hole in the left lung
    logits = torch.full((2, 16, 16), -5.0)
    logits[1, 2:12, 1:6] = logits[1, 2:12, 9:14] = 5.0
    logits[1, 14:16, 14:16] = 5.0  # fragment: removed (2 components kept)
    logits[1, 6, 3] = -5.0  # hole: filled
    logits[0] = -logits[1]
    item = {"pred": logits, "rows": 48, "columns": 64, "error": ""}
    for t in (DecideAtNetworkSized("pred", ["background", "lungs"], {"lungs": 2}), ResizeDecisiond("pred")):
        item = t(item)
    assert item["rule"] == "sign" and item["fields"].shape == (1, 16, 16)
    labels = item["pred"]
    assert tuple(labels.shape) == (1, 48, 64) and labels.dtype == torch.uint8
    assert torch.equal(item["structures"][0], labels[0])
    # at native size: no fragment, no hole; the decision is exactly the argmax of the bilinearly upsampled
    # logits of the cleaned picture (the clean-up mirrors the turned pixels' values: +-5 here)
    assert labels[0, 42:, 56:].sum() == 0 and labels[0, 18:21, 12:16].all()
    clean = logits.clone()
    clean[1, 14:16, 14:16] = clean[0, 6, 3] = -5.0
    clean[0, 14:16, 14:16] = clean[1, 6, 3] = 5.0
    up = torch.nn.functional.interpolate(clean[None], size=(48, 64), mode="bilinear", align_corners=False)[0]
    np.testing.assert_array_equal((up.argmax(0) == 1).numpy(), labels[0].bool().numpy())

    # sigmoid: 3 channels for lungs, heart, clavicles, which overlap; the later class wins in the label map
    logits = torch.full((3, 10, 10), -5.0)
    logits[0, 1:9, 1:4] = logits[0, 1:9, 6:9] = 5.0  # lungs
    logits[1, 5:9, 3:7] = 5.0  # heart
    logits[2, 1:3, 0:10] = 5.0  # clavicles across both lungs
    item = {"pred": logits, "rows": 10, "columns": 10, "error": ""}
    for t in (DecideAtNetworkSized("pred", ANATOMY, {"clavicles": 2}), ResizeDecisiond("pred")):
        item = t(item)
    labels, masks = item["pred"][0].numpy(), item["structures"].numpy()
    assert masks.shape == (3, 10, 10) and masks[0].sum() == 2 * 8 * 3  # full lungs, behind the clavicles too
    assert labels[1, 2] == 3 and labels[6, 2] == 1 and labels[6, 4] == 2 and labels[0, 0] == 0
    with pytest.raises(ValueError, match="output channels"):
        DecideAtNetworkSized("pred", ["background", "lungs"])({"pred": torch.zeros(4, 2, 2), "error": ""})


def test_decision_fields_read_at_any_size_keep_the_clean_up():
    """Bilinear resampling of the cleaned fields keeps what the clean-up decided, for the sign rule (2
    classes) and the argmax rule (3 or more softmax classes): one component per class at 10x the size."""
    import cv2
    from scipy import ndimage

    from scripts.postprocessing import clean_labels, decide_at_size, decision_fields

    eight = np.ones((3, 3))
    for seed in range(3):
        noise = np.random.default_rng(seed).normal(size=(40, 50)).astype(np.float32)
        smooth = cv2.GaussianBlur(noise, (0, 0), 2) * 20  # many blobs: fragments and holes to clean
        two = np.stack([np.zeros_like(smooth), smooth])
        fields, rule = decision_fields(two, ["background", "lungs"], {"lungs": 1})
        assert rule == "sign"
        cleaned = clean_labels((smooth > 0).astype(np.uint8), ["background", "lungs"], {"lungs": 1})
        np.testing.assert_array_equal(decide_at_size(fields, rule, (40, 50))[0], cleaned)
        big = decide_at_size(fields, rule, (400, 500))[0]
        assert ndimage.label(big, eight)[1] == 1
        assert not (ndimage.binary_fill_holes(big) & ~big.astype(bool)).any()

        three = np.stack([np.zeros_like(smooth), smooth, 2 - smooth])
        fields, rule = decision_fields(three, ["background", "a", "b"], {"a": 1, "b": 1})
        assert rule == "argmax" and fields.shape == (3, 40, 50)
        big = decide_at_size(fields, rule, (400, 500))
        assert [ndimage.label(m, eight)[1] for m in big] == [1, 1]
        # torch on a device gives the same masks as OpenCV on the CPU (here the CPU stands in for the device)
        via_torch = decide_at_size(torch.as_tensor(fields), rule, (400, 500))
        assert (via_torch != big).mean() < 1e-3


def test_find_inputs_recursive_with_names_and_skips(tmp_path):
    from scripts.inputs import find_inputs

    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    for rel in ("x.png", "a/b/y.jpg", "a/dup.png", ".hidden/z.png", ".dotfile.png"):
        img.save(root / rel)
    write_dicom(root / "a" / "dup.dcm", np.zeros((8, 8), np.uint8))
    write_dicom(root / "a" / "1.2.840.99", np.zeros((8, 8), np.uint8))  # DICOM named by UID, no extension
    (root / "notes.txt").write_text("not an image")
    (root / "README").write_text("not an image either")
    (root / "out").mkdir()
    img.save(root / "out" / "x_seg.png")  # an earlier run's output inside the input folder
    records = find_inputs(str(root), exclude=[str(root / "out")])
    assert [(r["rel"], r["name"]) for r in records] == [
        ("a/1.2.840.99", "a/1.2.840.99"),
        ("a/b/y.jpg", "a/b/y"),
        ("a/dup.dcm", "a/dup_dcm"),
        ("a/dup.png", "a/dup_png"),
        ("x.png", "x"),
    ]
    assert all(os.path.isabs(r["image"]) for r in records)
    assert find_inputs(str(tmp_path / "missing")) == []
    assert [r["rel"] for r in find_inputs(str(root / "x.png"))] == ["x.png"]


# ---- configs ---------------------------------------------------------------------------------------


def test_preprocessing_is_the_image_part_of_train_yaml(jsrt_scr):
    """Both configs' chains on a real radiograph give the same image tensor: they cannot drift apart."""
    from monai.bundle import ConfigParser

    stem = sorted((jsrt_scr / "images").glob("*.png"))[0].name
    image, label = str(jsrt_scr / "images" / stem), str(jsrt_scr / "masks" / stem)
    tensors = []
    for config, item in ((TRAIN, {"image": image, "label": label}), (INFER, {"image": image})):
        parser = ConfigParser()
        parser.read_config(config)
        parser["spatial_size"] = [128, 96]
        parser["clahe_clip_limit"] = 3.0
        chain = parser.get_parsed_content("preprocessing")
        transforms = chain.transforms if hasattr(chain, "transforms") else chain
        data = dict(item)
        for t in transforms:
            data = t(data)
        tensors.append(data["image"])
        names = [type(t).__name__ for t in transforms if "image" in t.keys]  # train's label-only steps left out
        display = ["DisplayCopyd"] if config == INFER else []  # inference's copy for the overlay (image unchanged)
        assert names == ["LoadRadiographd", "ScalePercentilesd", *display, "Resized", "CLAHEd", "EnsureTyped"]
    train_image, infer_image = tensors
    assert tuple(infer_image.shape) == (1, 128, 96) and infer_image.dtype == torch.float32
    assert torch.equal(train_image.as_tensor(), infer_image.as_tensor())


def test_config_has_zoo_inference_properties_and_overrides(tmp_path):
    wf = _workflow(tmp_path, dataset_dir=str(tmp_path), num_classes=4, class_names=ANATOMY, model_file="m.pt")
    wf.initialize()
    assert not wf.check_properties()
    parser = wf.parser
    assert parser.get_parsed_content("network_def").out_channels == 4
    assert parser.get_parsed_content("ckpt_path") == str(BUNDLE) + "/models/m.pt"
    assert parser.get_parsed_content("input_dir") == str(tmp_path)  # the alias reads the zoo's dataset_dir
    assert parser.get_parsed_content("writer").columns[-3:] == ["cardiothoracic_ratio", "qc_score", "qc_flags"]
    assert str(BUNDLE) in sys.path[:2]

    merged = _workflow(tmp_path, config_file=[INFER, str(BUNDLE / "configs" / "invertednet.yaml")],
                       input_dir=str(tmp_path))
    merged.initialize()
    assert not merged.check_properties()
    assert type(merged.parser.get_parsed_content("network_def")).__name__ == "InvertedNet"


def test_anatomy_override_merges_onto_inference_yaml(tmp_path):
    """anatomy.yaml merges onto inference.yaml alone (its +train/+validate entries are unused there);
    its dataset_dir and output_dir must not move the inputs or beat --output_dir."""
    anatomy = BUNDLE / "configs" / "anatomy.yaml"
    wf = _workflow(tmp_path, config_file=[INFER, str(anatomy)], input_dir=str(tmp_path))
    wf.initialize()
    assert not wf.check_properties()
    parser = wf.parser
    names = parser.get_parsed_content("class_names")
    assert names == ANATOMY
    assert parser.get_parsed_content("network_def").out_channels == parser.get_parsed_content("num_classes")
    from scripts.postprocessing import output_mode

    assert output_mode(parser.get_parsed_content("num_classes"), names) == "sigmoid"  # 3 channels, 4 classes
    assert parser.get_parsed_content("ckpt_path").endswith("/models/model_anatomy.pt")
    assert parser.get_parsed_content("datalist") == []  # input_dir (empty here), not anatomy's dataset_dir
    assert parser.get_parsed_content("output_dir") == str(tmp_path / "out")


# ---- end to end ------------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path, montgomery):
    """A folder of the same real radiograph in every format, another one nested, and broken files."""
    first, second = sorted((montgomery / "images").glob("*.png"))[:2]
    pixels = np.asarray(Image.open(first))
    root = tmp_path / "in"
    (root / "png" / "deeper" / "nested").mkdir(parents=True)
    (root / "dicom").mkdir()
    (root / "nifti").mkdir()
    shutil.copy(first, root / "png" / "ref.png")
    shutil.copy(second, root / "png" / "deeper" / "nested" / second.name)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(root / "png" / "ref16.png")
    Image.fromarray(np.stack([pixels] * 3, -1)).save(root / "png" / "rgb.jpg", quality=95)
    import nibabel as nib

    nib.save(nib.Nifti1Image(pixels.T.astype(np.float32), np.diag([0.4, 0.4, 1, 1])), root / "nifti" / "ref.nii.gz")
    write_dicom(root / "dicom" / "plain.dcm", pixels)  # MONOCHROME2, 8-bit
    write_dicom(root / "dicom" / "mono1.dcm", 255 - pixels, monochrome1=True, sop_class="CR")
    write_dicom(root / "dicom" / "IM0001", pixels.astype(np.uint16) * 15 + 100, bits_stored=12,  # no extension
                rescale=(2.0, -50.0), window=(4000.0, 9000.0))  # the window holds all values: linear
    write_dicom(root / "dicom" / "j2k.dcm", pixels.astype(np.uint16) * 256, bits_stored=16, compress="j2k")
    broken = write_broken_files(root / "broken", first, pixels)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), root / "broken" / "volume.nii.gz")
    broken["volume.nii.gz"] = "expected a 2D NIfTI image"
    (root / "notes.txt").write_text("not an image: not listed")
    return root, {f"broken/{k}": v for k, v in broken.items()}


def test_cli_segments_a_mixed_folder_and_reports_broken_files(tmp_path, mixed_folder):
    root, broken = mixed_folder
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--bundle_root", "bundle",
           "--config_file", "bundle/configs/inference.yaml", "--input_dir", str(root), "--output_dir", str(out),
           "--batch_size", "3", "--num_workers", "1"]  # the shipped lung model, so that the masks are real ones
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]

    good = ["dicom/IM0001", "dicom/j2k.dcm", "dicom/mono1.dcm", "dicom/plain.dcm", "nifti/ref.nii.gz",
            "png/deeper/nested/MCUCXR_0002_0.png", "png/ref.png", "png/ref16.png", "png/rgb.jpg"]
    rows = _rows(out / "results.csv")
    assert sorted(rows) == sorted(good + list(broken))  # notes.txt is not an input
    assert f"inference: {len(good)} succeeded, {len(broken)} failed -> {out}" in log
    for rel, reason in broken.items():
        assert rows[rel]["status"] == "failed" and reason in rows[rel]["error"], rows[rel]
        assert f"failed {root / rel}: " in log
        stem = rel.split(".")[0]
        assert not list(out.glob(f"{stem}*"))

    ref = _mask(out / "png" / "ref_seg.png")
    assert ref.shape == (256, 256) and set(np.unique(ref)) == {0, 1}
    for rel in good:
        row = rows[rel]
        assert row["status"] == "ok" and row["error"] == "", row
        name = out / rel.replace(".nii.gz", "").rsplit(".", 1)[0] if "." in Path(rel).name else out / rel
        mask = _mask(f"{name}_seg.png")
        assert mask.dtype == np.uint8 and mask.shape == (int(row["rows"]), int(row["columns"])) == (256, 256)
        assert Path(f"{name}_overlay.jpg").is_file()
        assert Path(f"{name}_seg.dcm").is_file() == rel.startswith("dicom/")
        assert int(row["lung_area_px"]) == int((mask == 1).sum())
        assert int(row["right_lung_area_px"]) + int(row["left_lung_area_px"]) == int(row["lung_area_px"])
        if rel != "png/deeper/nested/MCUCXR_0002_0.png":
            # same pixels (up to a linear map) through every format: the same mask
            agreement = (mask == ref).mean()
            assert agreement >= (0.98 if rel == "png/rgb.jpg" else 0.999), (rel, agreement)
    for rel in ("dicom/plain.dcm", "dicom/mono1.dcm", "dicom/j2k.dcm", "nifti/ref.nii.gz"):
        name = out / rel.replace(".nii.gz", "").replace(".dcm", "")
        np.testing.assert_array_equal(_mask(f"{name}_seg.png"), ref, err_msg=rel)

    # spacing: ImagerPixelSpacing 0.5 mm (DICOM), 0.4 mm (NIfTI), unknown for PNG
    assert rows["dicom/plain.dcm"]["spacing_mm"] == "0.5"
    plain = rows["dicom/plain.dcm"]
    assert float(plain["lung_area_cm2"]) == pytest.approx(int(plain["lung_area_px"]) * 0.5 * 0.5 / 100, abs=1e-3)
    assert rows["nifti/ref.nii.gz"]["spacing_mm"] == "0.4"
    assert rows["png/ref.png"]["spacing_mm"] == "" and rows["png/ref.png"]["lung_area_cm2"] == ""

    # the DICOM SEG references its source image and holds one segment per class but background
    import pydicom

    source = pydicom.dcmread(root / "dicom" / "mono1.dcm", stop_before_pixels=True)
    seg = pydicom.dcmread(out / "dicom" / "mono1_seg.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert len(seg.SegmentSequence) == 1 and seg.SegmentSequence[0].SegmentLabel == "lungs"
    refs = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [source.SOPInstanceUID]
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    np.testing.assert_array_equal(seg.pixel_array.astype(np.uint8), ref)

    # atomic writes leave no temporary files behind
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".partial"))]
    assert not leftovers


def test_anatomy_model_dicom_seg_segments_and_fail_on_error(tmp_path, montgomery):
    """The anatomy model (3 sigmoid channels: lungs, heart, clavicles): heart columns and CTR in the CSV,
    three segments in the SEG; fail_on_error raises after every output and results.csv are written."""
    import pydicom

    pixels = np.asarray(Image.open(sorted((montgomery / "images").glob("*.png"))[0]))
    root = tmp_path / "in"
    root.mkdir()
    write_dicom(root / "a.dcm", pixels, spacing=(0.2, 0.2))
    write_dicom(root / "b.dcm", pixels, rescale=(1.0, 0.0), compress="rle")
    (root / "c.png").write_bytes(b"")
    wf = _workflow(tmp_path, input_dir=str(root), num_classes=3, class_names=ANATOMY, spatial_size=[64, 64],
                   batch_size=2, ckpt_path=str(_weights(tmp_path / "w3.pt", num_classes=3)), fail_on_error=True)
    wf.initialize()
    with pytest.raises(RuntimeError) as info:
        wf.run()
    wf.finalize()
    assert "inference: 1 of 3 input(s) failed, see" in _cause(info.value, RuntimeError)
    out = tmp_path / "out"
    with open(out / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:8] == ["path", "status", "error", "warnings", "mask", "rows", "columns", "spacing_mm"]
    assert {"heart_area_px", "heart_area_cm2", "clavicles_area_px", "cardiothoracic_ratio", "qc_flags"} <= set(header)
    rows = _rows(out / "results.csv")
    assert rows["c.png"]["status"] == "failed" and "empty" in rows["c.png"]["error"]
    assert rows["a.dcm"]["status"] == rows["b.dcm"]["status"] == "ok"
    mask = _mask(out / "a_seg.png")
    assert set(np.unique(mask)) <= {0, 1, 2, 3} and len(np.unique(mask)) > 1
    np.testing.assert_array_equal(_mask(out / "b_seg.png"), mask)  # RLE-compressed copy: same mask
    seg = pydicom.dcmread(out / "a_seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lungs", "heart", "clavicles"]
    meanings = [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence]
    assert meanings == ["Lung", "Heart", "Clavicle"]
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        pydicom.dcmread(root / "a.dcm", stop_before_pixels=True).SOPInstanceUID
    # the SEG holds the full structures (they may overlap); the label map gives overlaps to the later class
    frames = seg.pixel_array.reshape(3, *mask.shape).astype(bool)
    heart = frames[1]
    assert int(rows["a.dcm"]["heart_area_px"]) == int(heart.sum())
    assert float(rows["a.dcm"]["heart_area_cm2"]) == pytest.approx(heart.sum() * 0.0004, abs=1e-3)
    assert int(rows["a.dcm"]["lung_area_px"]) == int(frames[0].sum())
    np.testing.assert_array_equal(mask == 3, frames[2])
    np.testing.assert_array_equal(mask == 2, heart & ~frames[2])


def test_missing_weights_or_inputs_stop_with_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "x.png")
    wf = _workflow(tmp_path, input_dir=str(tmp_path / "in"), ckpt_path=str(tmp_path / "none.pt"))
    wf.initialize()
    with pytest.raises(RuntimeError) as info:
        wf.run()
    assert "no model weights at" in _cause(info.value, FileNotFoundError)
    wf = _workflow(tmp_path, input_dir=str(tmp_path / "nothing"), ckpt_path=str(_weights(tmp_path / "w.pt")))
    wf.initialize()
    with pytest.raises(RuntimeError) as info:
        wf.run()
    assert "no radiograph" in _cause(info.value, FileNotFoundError)


@pytest.mark.parametrize("width, expected_width", [(256, 512), (700, 700), (2048, 1024)])
def test_overlay_is_screen_sized_and_written_as_rgb_png(tmp_path, width, expected_width):
    """Narrow images are enlarged, wide ones reduced (the mask keeps the native size); the PNG on disk
    has the overlay's pixels in RGB order."""
    from scripts.files import save_png
    from scripts.overlay import make_overlay

    height = width * 5 // 4
    image = np.tile(np.linspace(0, 4095, width, dtype=np.float32), (height, 1))
    masks = np.zeros((1, height, width), np.uint8)
    masks[0, height // 4 : height // 2, width // 8 : width // 2] = 1
    overlay = make_overlay(image, masks, ["background", "lungs"], [("lungs", (40, 220, 90))])
    assert overlay.dtype == np.uint8 and overlay.shape[1:] == (expected_width, 3)
    assert overlay.shape[0] > round(height * expected_width / width)  # the legend band below the picture
    centre = overlay[round(3 * height / 8 * expected_width / width), round(5 * width / 16 * expected_width / width)]
    assert centre[1] > centre[0] + 20 and centre[1] > centre[2] + 20  # the lungs' green over a grey image

    path = tmp_path / "overlay.png"
    save_png(overlay, str(path))
    with Image.open(path) as written:
        assert written.mode == "RGB" and (np.asarray(written) == overlay).all()


def test_overlay_draws_the_ctr_calipers_of_heart_and_thorax():
    from scripts.overlay import class_colours, make_overlay

    image = np.full((600, 600), 100, np.float32)
    masks = np.zeros((3, 600, 600), np.uint8)  # lungs, heart, clavicles
    masks[0, 100:500, 60:260] = masks[0, 100:500, 340:540] = 1  # thorax: columns 60..539
    masks[1, 300:401, 200:401] = 1  # heart: columns 200..400, middle row 350
    names = ANATOMY
    overlay = make_overlay(image, masks, names, [])
    colours = class_colours(names)
    heart_row = overlay[350]
    assert (heart_row[210:391] == colours[2]).all()  # the heart caliper, not the translucent fill
    assert not (heart_row[100:150] == colours[2]).all(axis=-1).any()  # it stops at the heart's borders
    thorax_rows = [r for r in range(401, 500) if (overlay[r, 70:530] == colours[1]).all()]
    assert thorax_rows  # the thorax caliper, below the heart, from one outer lung border to the other
    lungs_only = make_overlay(image, masks[:1], ["background", "lungs"], [])
    assert not any((lungs_only[r, 70:530] == colours[1]).all() for r in range(401, 500))  # no CTR: no calipers


def test_overlay_fill_is_the_translucent_blend_of_each_class_in_turn():
    """The fill (a lookup table since 0.6) gives exactly OpenCV's whole-picture blend, 0.75 x picture + 0.25 x colour
    inside each mask, applied class after class where masks overlap; the outlines are left out of the comparison."""
    import cv2

    from scripts.overlay import class_colours, make_overlay

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (520, 640), dtype=np.uint8)
    names = ["background", "lungs", "mediastinum", "clavicles"]  # no heart: no CTR calipers over the fills
    masks = np.zeros((3, 520, 640), np.uint8)
    masks[0, 40:480, 40:600] = 1  # lungs
    masks[1, 200:460, 200:520] = 1  # inside the lungs: blended over the lungs' fill
    masks[2, 20:120, 300:620] = 1  # clavicles, partly outside the lungs
    expected = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    for mask, colour in zip(masks, class_colours(names).values()):
        shaded = cv2.multiply(expected, (0.75, 0.75, 0.75, 0))
        cv2.add(shaded, tuple(0.25 * c for c in colour) + (0,), dst=expected, mask=mask)
    picture = make_overlay(grey, masks, names, [])[:520]
    near_outline = np.zeros((520, 640), np.uint8)
    for mask in masks:
        edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        near_outline |= cv2.dilate(edge, np.ones((9, 9), np.uint8))
    away = near_outline == 0
    assert away.mean() > 0.8
    np.testing.assert_array_equal(picture[away], expected[away])
    inside = away & (masks[1] > 0)
    assert (picture[inside] != cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)[inside]).any()  # it was filled at all


def test_writer_processes_write_what_the_evaluator_thread_writes(tmp_path, mixed_folder, monkeypatch):
    """Files written by the writer processes, forked (Linux) or spawned (macOS, Windows), are the same as written
    in line, and results.csv keeps input order."""
    from scripts.writer import SegmentationWriter

    root, broken = mixed_folder
    weights = str(_weights(tmp_path / "w.pt"))
    outputs = {}
    for threads, start_method in ((0, None), (2, "fork"), (2, "spawn")):
        if start_method:
            monkeypatch.setattr(SegmentationWriter, "start_method", start_method)
        out = tmp_path / f"out{threads}{start_method}"
        wf = _workflow(tmp_path, input_dir=str(root), output_dir=str(out), ckpt_path=weights,
                       spatial_size=[64, 64], batch_size=3, write_workers=threads, write_dicom_seg=False)
        wf.initialize()
        wf.run()
        wf.finalize()
        outputs[threads if start_method != "spawn" else "spawn"] = out
    assert (outputs["spawn"] / "results.csv").read_text() == (outputs[0] / "results.csv").read_text()
    csv0, csv2 = ((outputs[t] / "results.csv").read_text() for t in (0, 2))
    assert csv0 == csv2
    from scripts.inputs import find_inputs

    paths = [row["path"] for row in csv.DictReader(csv0.splitlines())]
    assert paths == [r["rel"] for r in find_inputs(str(root))] and len(paths) == 9 + len(broken)
    files0 = sorted(p.relative_to(outputs[0]) for p in outputs[0].rglob("*_*.*") if p.suffix in (".png", ".jpg"))
    files2 = sorted(p.relative_to(outputs[2]) for p in outputs[2].rglob("*_*.*") if p.suffix in (".png", ".jpg"))
    assert files0 == files2 and len(files0) == 18  # a mask and an overlay for each of the 9 radiographs
    for rel in files0:
        for other in (outputs[2], outputs["spawn"]):
            np.testing.assert_array_equal(_mask(outputs[0] / rel), _mask(other / rel), err_msg=str(rel))


def test_a_writer_process_that_dies_costs_no_other_study(tmp_path, montgomery, monkeypatch):
    """A writer process killed while it writes (out of memory, a crash in a library): the studies it held are
    written again, each in a process of its own; only the study whose own process dies again fails, the run
    goes on with new writer processes, and results.csv has every row."""
    import signal

    from scripts.outputs import OutputFiles

    root = tmp_path / "in"
    root.mkdir()
    images = sorted((montgomery / "images").glob("*.png"))[:8]
    for i, image in enumerate(images):
        shutil.copy(image, root / (f"{i}_killer.png" if i == 2 else f"{i}.png"))
    write = OutputFiles.write

    def dies_on_the_killer(self, record):  # runs in the (forked) writer processes
        if record["name"].endswith("_killer") and os.getpid() != main_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, record)

    dies_on_the_killer.__name__ = "write"  # pickled by name, as the pool hands the method to the processes
    main_pid = os.getpid()
    monkeypatch.setattr(OutputFiles, "write", dies_on_the_killer)
    out = tmp_path / "out"
    wf = _workflow(tmp_path, input_dir=str(root), output_dir=str(out), ckpt_path=str(_weights(tmp_path / "w.pt")),
                   spatial_size=[64, 64], batch_size=2, write_workers=2, write_dicom_seg=False)
    wf.initialize()
    wf.run()
    wf.finalize()
    rows = _rows(out / "results.csv")
    assert list(rows) == sorted(p.name for p in root.iterdir()) and len(rows) == 8
    assert rows["2_killer.png"]["status"] == "failed"
    assert "writer process died" in rows["2_killer.png"]["error"]
    for name, row in rows.items():
        if name != "2_killer.png":
            assert row["status"] == "ok", row
            assert (out / row["mask"]).is_file() and (out / row["mask"].replace("_seg.png", "_overlay.jpg")).is_file()
    assert not (out / "2_killer_seg.png").exists()


@pytest.mark.parametrize("value", [True, False])
def test_cudnn_benchmark_key_sets_torch(tmp_path, value):
    before = torch.backends.cudnn.benchmark
    try:
        wf = _workflow(tmp_path, input_dir=str(tmp_path), cudnn_benchmark=value)
        wf.initialize()
        assert torch.backends.cudnn.benchmark is value
    finally:
        torch.backends.cudnn.benchmark = before


def test_resume_segments_only_what_an_earlier_run_left_undone(tmp_path, mixed_folder):
    """A run killed part-way: a mask is missing and a row is gone. --resume True redoes those (and the failed
    files), leaves the finished outputs untouched, and writes the same results.csv as one whole run."""
    root, broken = mixed_folder
    out = tmp_path / "out"
    common = dict(input_dir=str(root), output_dir=str(out), ckpt_path=str(_weights(tmp_path / "w.pt")),
                  spatial_size=[64, 64], batch_size=3)

    def run(**override):
        wf = _workflow(tmp_path, **common, **override)
        wf.initialize()
        wf.run()
        wf.finalize()
        return wf

    run()
    whole = (out / "results.csv").read_text()
    # as if killed: one mask not written, one row not written, results.csv still .partial
    (out / "png" / "ref_seg.png").unlink()
    lines = whole.splitlines(keepends=True)
    dropped = next(line for line in lines if line.startswith("png/rgb.jpg,"))
    (out / "results.csv.partial").write_text("".join(line for line in lines if line is not dropped))
    (out / "results.csv").unlink()
    untouched = out / "dicom" / "mono1_seg.png"
    stamp = untouched.stat().st_mtime_ns

    wf = run(resume=True)
    redone = sorted(r["rel"] for r in wf.parser.get_parsed_content("datalist"))
    assert redone == sorted(["png/ref.png", "png/rgb.jpg", *broken])
    assert (out / "results.csv").read_text() == whole
    assert (out / "png" / "ref_seg.png").is_file() and untouched.stat().st_mtime_ns == stamp
    assert not (out / "results.csv.partial").exists()

    wf = run(resume=True)  # nothing left but the failed files
    assert sorted(r["rel"] for r in wf.parser.get_parsed_content("datalist")) == sorted(broken)
    assert (out / "results.csv").read_text() == whole


def test_resume_with_nothing_left_rewrites_results_csv_and_runs_no_network(tmp_path, montgomery):
    root = tmp_path / "in"
    root.mkdir()
    for image in sorted((montgomery / "images").glob("*.png"))[:2]:
        shutil.copy(image, root / image.name)
    common = dict(input_dir=str(root), ckpt_path=str(_weights(tmp_path / "w.pt")), spatial_size=[64, 64])
    wf = _workflow(tmp_path, **common)
    wf.initialize()
    wf.run()
    wf.finalize()
    whole = (tmp_path / "out" / "results.csv").read_text()
    wf = _workflow(tmp_path, resume=True, **common)
    wf.initialize()
    wf.run()
    assert wf.parser.get_parsed_content("datalist") == []
    assert wf.parser.get_parsed_content("evaluator").state.iteration == 0  # the network did not run
    wf.finalize()
    assert (tmp_path / "out" / "results.csv").read_text() == whole


def test_unet_levels_set_in_one_place_reach_training_and_inference(tmp_path, montgomery):
    """--unet_channels/--unet_strides build the same (here five-level) UNet from train.yaml and from
    inference.yaml, so weights trained with them load (strictly) for inference and segment."""
    from monai.bundle import ConfigParser

    levels = dict(unet_channels=[8, 16, 32, 64, 128, 256], unet_strides=[2, 2, 2, 2, 2])
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(levels)
    trained = parser.get_parsed_content("network_def")
    assert len(trained.state_dict()) > len(torch.load(_weights(tmp_path / "w4.pt"), weights_only=True))
    torch.save(trained.state_dict(), tmp_path / "w5.pt")
    image = sorted((montgomery / "images").glob("*.png"))[0]
    (tmp_path / "in").mkdir()
    shutil.copy(image, tmp_path / "in" / image.name)
    wf = _workflow(tmp_path, input_dir=str(tmp_path / "in"), ckpt_path=str(tmp_path / "w5.pt"), spatial_size=[64, 64],
                   **levels)
    wf.initialize()
    wf.run()
    wf.finalize()
    mask = _mask(tmp_path / "out" / f"{image.stem}_seg.png")
    assert mask.shape == np.asarray(Image.open(image)).shape[:2]


def test_dicom_exports_keep_every_study_and_their_segs_read_back(tmp_path, montgomery):
    """Archive exports: de-identified DX and CR (type-2 attributes absent), MONOCHROME1, 12-bit with a
    modality LUT, lossless RLE / JPEG 2000 / JPEG-LS. Every study is `ok` with its mask; every SEG reads
    back with highdicom's segread and gives the mask; a SEG that cannot be made (here: the source lacks
    the type-1 SeriesInstanceUID) costs the study nothing but a warning, and --resume does not redo it."""
    import highdicom as hd
    import pydicom

    pixels = np.asarray(Image.open(sorted((montgomery / "images").glob("*.png"))[3])).astype(np.uint16) * 16
    root = tmp_path / "in"
    root.mkdir()
    common = dict(bits_stored=12, rescale=(0.5, -100.0), deidentified=True)
    write_dicom(root / "dx.dcm", pixels, **common)
    write_dicom(root / "cr_mono1.dcm", 4095 - pixels, monochrome1=True, sop_class="CR", **common)
    for compress in ("rle", "j2k", "jpegls"):
        write_dicom(root / f"{compress}.dcm", pixels, compress=compress, **common)
    ds = write_dicom(root / "no_series.dcm", pixels, **common)
    del ds.SeriesInstanceUID
    ds.save_as(root / "no_series.dcm", enforce_file_format=True)
    weights = _weights(tmp_path / "w.pt")
    wf = _workflow(tmp_path, input_dir=str(root), ckpt_path=str(weights), spatial_size=[64, 64], batch_size=4)
    wf.initialize()
    wf.run()
    wf.finalize()
    out = tmp_path / "out"
    rows = _rows(out / "results.csv")
    assert sorted(rows) == sorted(p.name for p in root.iterdir())
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert "DICOM SEG not written" in rows["no_series.dcm"]["warnings"]
    assert "SeriesInstanceUID" in rows["no_series.dcm"]["warnings"]
    assert rows["no_series.dcm"]["lung_area_px"] and (out / "no_series_seg.png").is_file()
    assert (out / "no_series_overlay.jpg").is_file() and not (out / "no_series_seg.dcm").exists()
    reference = _mask(out / "dx_seg.png")
    assert set(np.unique(reference)) == {0, 1}
    for name in ("dx", "cr_mono1", "rle", "j2k", "jpegls"):
        assert rows[f"{name}.dcm"]["warnings"] == ""
        mask = _mask(out / f"{name}_seg.png")
        np.testing.assert_array_equal(mask, reference, err_msg=name)  # same pixels: the same mask
        source = pydicom.dcmread(root / f"{name}.dcm", stop_before_pixels=True)
        seg = hd.seg.segread(out / f"{name}_seg.dcm")
        frames = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1],
                                                   combine_segments=False)
        np.testing.assert_array_equal(frames[0, ..., 0], mask, err_msg=name)

    # resuming: nothing to redo (the missing SEG is named in warnings, so the study counts as done)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*_seg.png")}
    wf = _workflow(tmp_path, input_dir=str(root), ckpt_path=str(weights), spatial_size=[64, 64], resume=True)
    wf.initialize()
    wf.run()
    wf.finalize()
    assert {p: p.stat().st_mtime_ns for p in out.glob("*_seg.png")} == stamps
    assert _rows(out / "results.csv") == rows


def test_mask_png_reads_back_exactly(tmp_path):
    """The mask PNG (no filter, run-length deflate) is a plain 8-bit grey PNG: Pillow and OpenCV read the labels."""
    import cv2

    from scripts.files import save_mask_png

    rng = np.random.default_rng(0)
    labels = np.zeros((2500, 2048), np.uint8)
    labels[300:2000, 200:900], labels[300:2100, 1100:1850], labels[900:1700, 700:1300] = 1, 1, 2
    labels[rng.random(labels.shape) < 0.001] = 3  # scattered values: not only long runs
    save_mask_png(labels, str(tmp_path / "m_seg.png"))
    with Image.open(tmp_path / "m_seg.png") as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), labels)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "m_seg.png"), cv2.IMREAD_UNCHANGED), labels)


def test_display_copy_is_the_scaled_image_reduced_to_fit():
    from scripts.transforms import DisplayCopyd

    rows, columns = np.mgrid[:2500, :2048].astype(np.float32)
    scaled = np.clip(0.5 + 0.6 * np.sin(rows / 150) * np.cos(columns / 110), 0, 1)[None]  # smooth, scaled
    display = DisplayCopyd("image", max_size=1024)({"image": torch.from_numpy(scaled)})["display"]
    assert display.dtype == np.uint8 and display.shape == (1024, 839)
    import cv2

    expected = cv2.resize(np.clip(scaled[0], 0, 1), (839, 1024), interpolation=cv2.INTER_AREA) * 255
    assert np.abs(display.astype(np.float32) - expected).max() <= 2.0  # 8 bits and the integer step first
    small = DisplayCopyd("image", max_size=1024)({"image": torch.from_numpy(scaled[:, :300, :200])})["display"]
    np.testing.assert_array_equal(small, np.rint(np.clip(scaled[0, :300, :200], 0, 1) * 255).astype(np.uint8))


def test_overlay_jpeg_has_no_chroma_subsampling(tmp_path):
    """Overlays are JPEG 4:4:4, so that one-pixel coloured outlines keep their colour."""
    from PIL import JpegImagePlugin

    from scripts.files import save_jpeg

    picture = np.full((64, 64, 3), 128, np.uint8)
    picture[:, 31] = (40, 220, 90)  # a one-pixel green outline
    save_jpeg(picture, str(tmp_path / "o.jpg"))
    with Image.open(tmp_path / "o.jpg") as img:
        assert JpegImagePlugin.get_sampling(img) == 0  # 4:4:4
        line = np.asarray(img.convert("RGB"))[:, 31].astype(int)
    assert np.abs(line - (40, 220, 90)).max() <= 12


def test_a_broken_highdicom_is_said_once_and_no_seg_is_attempted(tmp_path, monkeypatch, caplog):
    """Before the run (check_ready) the writer builds one tiny SEG when an input may be DICOM: a highdicom that
    cannot write one here is a single warning at the start (and no per-study warnings), not a failure of every
    study."""
    import logging

    import scripts.dicom_seg
    from scripts.writer import SegmentationWriter

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    inputs = [{"image": str(tmp_path / "a.png"), "rel": "a.png"}, {"image": str(tmp_path / "b.dcm"), "rel": "b.dcm"}]
    works = SegmentationWriter(str(tmp_path), ["background", "lungs"])
    works.check_ready(inputs, str(weights))
    assert works.write_dicom_seg  # the installed one works

    def broken(*args, **kwargs):
        raise AttributeError("module 'pydicom' has no attribute 'something_highdicom_needs'")

    monkeypatch.setattr(scripts.dicom_seg, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="cxr_segmentation.inference"):
        writer = SegmentationWriter(str(tmp_path), ["background", "lungs"])
        writer.check_ready(inputs, str(weights))
        writer.check_dicom_seg()  # the run's start asks again: said once
    assert not writer.write_dicom_seg and not writer.files.write_dicom_seg
    said = [r.getMessage() for r in caplog.records if "cannot write a DICOM SEG" in r.getMessage()]
    assert len(said) == 1, said


def test_no_highdicom_work_for_a_folder_without_dicom(tmp_path, monkeypatch):
    """highdicom's check and first-use work (about 0.8 s of start-up) happen only when an input may be DICOM:
    a .dcm, a .dicom or a file without an image or NIfTI name (find_inputs lists those when they hold DICOM)."""
    import scripts.dicom_seg
    from scripts.writer import SegmentationWriter

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    calls = []
    monkeypatch.setattr(scripts.dicom_seg, "warm_up", lambda *a, **k: calls.append(a))
    images = [{"image": str(tmp_path / n), "rel": n} for n in ("a.png", "b/c.JPG", "d.tiff", "e.nii.gz", "f.bmp")]
    writer = SegmentationWriter(str(tmp_path), ["background", "lungs"])
    writer.check_ready(images, str(weights))
    writer.check_dicom_seg()  # as the run's start does
    assert calls == [] and writer.write_dicom_seg  # asked for; nothing to check: no DICOM input
    for dicom_name in ("g.dcm", "h.DICOM", "IM0001"):
        calls.clear()
        writer = SegmentationWriter(str(tmp_path), ["background", "lungs"])
        writer.check_ready(images + [{"image": str(tmp_path / dicom_name), "rel": dicom_name}], str(weights))
        writer.check_dicom_seg()
        assert len(calls) == 1, dicom_name  # checked once, before the run
    calls.clear()
    SegmentationWriter(str(tmp_path), ["background", "lungs"]).check_dicom_seg()  # a run without check_ready
    assert len(calls) == 1
