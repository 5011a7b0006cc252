"""Tests for data/prepare_data.py on tiny fixtures written in the official download formats."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "prepare_data.py"

_spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
prepare_data = importlib.util.module_from_spec(_spec)
sys.modules["prepare_data"] = prepare_data  # dataclasses look the module up
_spec.loader.exec_module(prepare_data)


# --------------------------------------------------------------------------- fixture helpers


def rect(shape, top, bottom, left, right) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def read_manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {row["stem"]: row for row in csv.DictReader(f)}


# JSRT / SCR: shapes in SCR's 1024 x 1024 mask space, edges on even pixels so a 2x nearest
# reduction is exactly mask[::2, ::2].
SCR = (1024, 1024)
SCR_SHAPES = {
    "left lung": rect(SCR, 200, 700, 100, 450),
    "right lung": rect(SCR, 200, 700, 574, 924),
    "heart": rect(SCR, 500, 800, 400, 650),          # overlaps both lungs in rows 500-700
    "left clavicle": rect(SCR, 150, 250, 100, 450),  # overlaps the left lung in rows 200-250
    "right clavicle": rect(SCR, 150, 250, 574, 924),
}
# Raw JSRT values: high = dark film. The "bright" square is raw-dark (low values).
RAW_BACKGROUND, RAW_BRIGHT = 4000, 100
BRIGHT_SQUARE = (slice(800, 1200), slice(800, 1200))  # in 2048 space
STRIPES = (slice(1600, 1800), slice(1600, 1800))  # 1-pixel columns, raw 95 / 4095


def make_jsrt(root: Path, stems_by_fold: dict[str, list[str]], sep: str = " ") -> tuple[Path, Path]:
    """JSRT .IMG files (2048x2048 >u2 raw) and SCR GIF masks under fold*/masks/<structure>/."""
    images, scr = root / "jsrt", root / "scr"
    images.mkdir(parents=True)
    raw = np.full((2048, 2048), RAW_BACKGROUND, dtype=">u2")
    raw[BRIGHT_SQUARE] = RAW_BRIGHT
    raw[STRIPES] = 4095
    raw[STRIPES[0], 1600:1800:2] = 95
    for fold, stems in stems_by_fold.items():
        for stem in stems:
            raw.tofile(images / f"{stem}.IMG")
            for structure, mask in SCR_SHAPES.items():
                folder = scr / fold / "masks" / structure.replace(" ", sep)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{stem}.gif")
    return images, scr


# Montgomery: 16-bit PNG (12-bit values), non-square, separate left/right masks.
MC_SHAPE = (50, 60)  # rows, cols
MC_LEFT = rect(MC_SHAPE, 10, 40, 5, 25)
MC_RIGHT = rect(MC_SHAPE, 12, 42, 35, 55)


def make_montgomery(root: Path, stems: list[str]) -> Path:
    src = root / "MontgomerySet"
    for sub in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
        (src / sub).mkdir(parents=True)
    image = np.full(MC_SHAPE, 500, dtype=np.uint16)
    image[MC_LEFT | MC_RIGHT] = 4000
    for stem in stems:
        Image.fromarray(image).save(src / "CXR_png" / f"{stem}.png")  # mode I;16
        # left mask 0/255 grayscale, right mask 0/1 grayscale: both must read as binary
        Image.fromarray(MC_LEFT.astype(np.uint8) * 255).save(
            src / "ManualMask/leftMask" / f"{stem}.png")
        Image.fromarray(MC_RIGHT.astype(np.uint8)).save(
            src / "ManualMask/rightMask" / f"{stem}.png")
    return src


# Shenzhen: RGB and gray images, RGB 0/255 *_mask.png in a separate folder.
SZ_SHAPE = (40, 48)
SZ_LUNG = rect(SZ_SHAPE, 8, 30, 6, 20) | rect(SZ_SHAPE, 8, 30, 28, 42)


def make_shenzhen(root: Path, with_mask: list[str], without_mask: list[str]) -> tuple[Path, Path]:
    src, masks = root / "ChinaSet_AllFiles", root / "shcxr-lung-mask" / "mask"
    (src / "CXR_png").mkdir(parents=True)
    masks.mkdir(parents=True)
    gray = np.full(SZ_SHAPE, 60, dtype=np.uint8)
    gray[SZ_LUNG] = 200
    for i, stem in enumerate(with_mask + without_mask):
        image = Image.fromarray(gray)
        (image.convert("RGB") if i % 2 == 0 else image).save(src / "CXR_png" / f"{stem}.png")
    for stem in with_mask:
        mask = Image.fromarray(SZ_LUNG.astype(np.uint8) * 255).convert("RGB")
        mask.save(masks / f"{stem}_mask.png")
    return src, masks


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- JSRT


@pytest.fixture(scope="module")
def jsrt_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsrt")
    images, scr = make_jsrt(root, {"fold1": ["JPCLN001", "JPCNN001"], "fold2": ["JPCLN002"]})
    out = root / "out"
    status = prepare_data.main(["jsrt", "--images", str(images), "--scr", str(scr),
                                "--out", str(out)])
    return status, out


def test_jsrt_outputs_sizes_labels_and_manifest(jsrt_out):
    status, out = jsrt_out
    assert status == 0
    stems = ["JPCLN001", "JPCLN002", "JPCNN001"]
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == stems
    for stem in stems:
        image = Image.open(out / "images" / f"{stem}.png")
        assert image.mode == "L" and image.size == (512, 512)
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.mode == "L" and mask.size == (512, 512)
        assert set(np.unique(read(out / "masks" / f"{stem}.png"))) == {0, 1, 2, 3}
        for key in ("lungs", "heart", "clavicles"):
            structure = read(out / "structures" / key / f"{stem}.png")
            assert structure.shape == (512, 512) and set(np.unique(structure)) == {0, 1}
    rows = read_manifest(out)
    assert list(rows) == stems
    assert rows["JPCLN001"] == dict(stem="JPCLN001", group="nodule", width="512",
                                    height="512", labels_present="0 1 2 3")
    assert rows["JPCNN001"]["group"] == "non-nodule"
    assert not list(out.rglob("*.tmp"))


def test_jsrt_overlap_rule_and_structures(jsrt_out):
    _, out = jsrt_out
    half = {k: v[::2, ::2] for k, v in SCR_SHAPES.items()}
    lungs = half["left lung"] | half["right lung"]
    clavicles = half["left clavicle"] | half["right clavicle"]
    expected = np.zeros((512, 512), np.uint8)
    expected[lungs], expected[half["heart"]], expected[clavicles] = 1, 2, 3

    labels = read(out / "masks" / "JPCLN001.png")
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(read(out / "structures/lungs/JPCLN001.png"), lungs)
    np.testing.assert_array_equal(read(out / "structures/heart/JPCLN001.png"), half["heart"])
    np.testing.assert_array_equal(read(out / "structures/clavicles/JPCLN001.png"), clavicles)
    # clavicle over lung (1024 space: row 220, col 200): 3 in the label map, still lung
    assert labels[110, 100] == 3
    assert read(out / "structures/lungs/JPCLN001.png")[110, 100] == 1
    # heart over lung (row 600, col 420): 2 in the label map, still lung
    assert labels[300, 210] == 2
    assert read(out / "structures/lungs/JPCLN001.png")[300, 210] == 1


def test_jsrt_inversion_makes_raw_dark_region_bright(jsrt_out):
    _, out = jsrt_out
    image = read(out / "images" / "JPCLN001.png")
    # raw 100 -> (4095 - 100) / 4095 * 255 = 249; raw 4000 -> 6
    assert image[250, 250] == round((4095 - RAW_BRIGHT) / 4095 * 255)
    assert image[10, 10] == round((4095 - RAW_BACKGROUND) / 4095 * 255)
    # area averaging: the 4x reduction keeps the square's edge sharp (2048/4 = 512 aligned)
    assert image[200, 200] > 240 and image[199, 199] < 10
    # 1-pixel stripes (inverted 4000 / 0) average to 2000 / 4095 * 255 = 125 (not 0 or 249)
    assert abs(int(image[425, 425]) - 125) <= 1


def test_jsrt_16bit_size_and_underscore_folders(tmp_path):
    images, scr = make_jsrt(tmp_path, {"fold1": ["JPCLN003"]}, sep="_")
    out = tmp_path / "out"
    status = prepare_data.main(["jsrt", "--images", str(images), "--scr", str(scr),
                                "--out", str(out), "--size", "256", "--bit-depth", "16"])
    assert status == 0
    image = Image.open(out / "images" / "JPCLN003.png")
    assert image.mode.startswith("I;16") and image.size == (256, 256)
    assert np.asarray(image)[125, 125] == round((4095 - RAW_BRIGHT) / 4095 * 65535)
    labels = read(out / "masks" / "JPCLN003.png")
    assert labels.shape == (256, 256) and labels.dtype == np.uint8
    assert labels[55, 50] == 3 and labels[150, 105] == 2 and labels[100, 50] == 1


def test_jsrt_broken_image_is_reported_and_others_convert(tmp_path):
    images, scr = make_jsrt(tmp_path, {"fold1": ["JPCLN001", "JPCLN002"]})
    (images / "JPCLN002.IMG").write_bytes(b"\x00" * 1000)  # truncated raw file
    out = tmp_path / "out"
    result = run_cli("jsrt", "--images", images, "--scr", scr, "--out", out)
    assert result.returncode == 1
    assert "JPCLN002.IMG" in result.stderr and "expected 8388608" in result.stderr
    assert "converted 1, skipped 0, failed 1" in result.stdout
    assert (out / "images" / "JPCLN001.png").exists()
    assert not (out / "images" / "JPCLN002.png").exists()
    assert list(read_manifest(out)) == ["JPCLN001"]


def test_jsrt_missing_scr_folder_is_a_clear_error(tmp_path, capsys):
    images, scr = make_jsrt(tmp_path, {"fold1": ["JPCLN001"]})
    for gif in (scr / "fold1" / "masks" / "heart").iterdir():
        gif.unlink()
    (scr / "fold1" / "masks" / "heart").rmdir()
    status = prepare_data.main(["jsrt", "--images", str(images), "--scr", str(scr),
                                "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err
    assert "'heart'" in err and str(scr) in err


# --------------------------------------------------------------------------- Montgomery


def test_montgomery_merges_left_and_right_native_size(tmp_path):
    src = make_montgomery(tmp_path, ["MCUCXR_0001_0", "MCUCXR_0002_1"])
    out = tmp_path / "out"
    assert prepare_data.main(["montgomery", "--src", str(src), "--out", str(out)]) == 0
    labels = read(out / "masks" / "MCUCXR_0001_0.png")
    np.testing.assert_array_equal(labels, (MC_LEFT | MC_RIGHT).astype(np.uint8))
    image = Image.open(out / "images" / "MCUCXR_0001_0.png")
    assert image.mode == "L" and image.size == (60, 50)  # native size kept, (width, height)
    pixels = np.asarray(image)
    # 12-bit data in a 16-bit PNG is scaled by 4095, not 65535
    assert pixels[20, 10] == round(4000 / 4095 * 255) and pixels[0, 0] == round(500 / 4095 * 255)
    rows = read_manifest(out)
    assert rows["MCUCXR_0001_0"] == dict(stem="MCUCXR_0001_0", group="normal", width="60",
                                         height="50", labels_present="0 1")
    assert rows["MCUCXR_0002_1"]["group"] == "tuberculosis"


def test_montgomery_square_resize(tmp_path):
    src = make_montgomery(tmp_path, ["MCUCXR_0001_0"])
    out = tmp_path / "out"
    assert prepare_data.main(["montgomery", "--src", str(src), "--out", str(out),
                              "--size", "32"]) == 0
    assert Image.open(out / "images" / "MCUCXR_0001_0.png").size == (32, 32)
    labels = read(out / "masks" / "MCUCXR_0001_0.png")
    assert labels.shape == (32, 32) and set(np.unique(labels)) == {0, 1}
    assert read_manifest(out)["MCUCXR_0001_0"]["width"] == "32"


def test_montgomery_broken_and_missing_mask_are_reported(tmp_path):
    src = make_montgomery(tmp_path, ["MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0"])
    (src / "CXR_png" / "MCUCXR_0002_1.png").write_bytes(b"not a png")
    (src / "ManualMask" / "rightMask" / "MCUCXR_0003_0.png").unlink()
    out = tmp_path / "out"
    result = run_cli("montgomery", "--src", src, "--out", out)
    assert result.returncode == 1
    assert "MCUCXR_0002_1.png" in result.stderr
    assert "rightMask/MCUCXR_0003_0.png" in result.stderr
    assert "converted 1, skipped 0, failed 2" in result.stdout
    assert list(read_manifest(out)) == ["MCUCXR_0001_0"]


def test_montgomery_wrong_folder_error(tmp_path):
    wrong = tmp_path / "Downloads"
    wrong.mkdir()
    result = run_cli("montgomery", "--src", wrong, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert str(wrong / "CXR_png") in result.stderr and "MontgomerySet" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Shenzhen


def test_shenzhen_skips_images_without_mask(tmp_path):
    src, masks = make_shenzhen(tmp_path, ["CHNCXR_0001_0", "CHNCXR_0002_1"], ["CHNCXR_0003_1"])
    out = tmp_path / "out"
    result = run_cli("shenzhen", "--src", src, "--masks", masks.parent, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "CHNCXR_0003_1" in result.stderr
    assert "converted 2, skipped 1, failed 0" in result.stdout
    rows = read_manifest(out)
    assert list(rows) == ["CHNCXR_0001_0", "CHNCXR_0002_1"]  # no _mask suffix
    assert rows["CHNCXR_0002_1"]["group"] == "tuberculosis"
    assert rows["CHNCXR_0001_0"]["labels_present"] == "0 1"
    for stem in rows:
        image = Image.open(out / "images" / f"{stem}.png")
        assert image.mode == "L" and image.size == (48, 40)  # RGB source becomes grayscale
        np.testing.assert_array_equal(read(out / "masks" / f"{stem}.png"), SZ_LUNG)
        assert read(out / "images" / f"{stem}.png")[20, 10] == 200
    assert not (out / "masks" / "CHNCXR_0003_1.png").exists()
    assert not list((out / "masks").glob("*_mask.png"))


def test_shenzhen_square_resize(tmp_path):
    src, masks = make_shenzhen(tmp_path, ["CHNCXR_0001_0"], [])
    out = tmp_path / "out"
    assert prepare_data.main(["shenzhen", "--src", str(src), "--masks", str(masks),
                              "--out", str(out), "--size", "24"]) == 0
    assert Image.open(out / "images" / "CHNCXR_0001_0.png").size == (24, 24)
    assert set(np.unique(read(out / "masks" / "CHNCXR_0001_0.png"))) == {0, 1}


def test_shenzhen_mask_folder_without_masks_is_an_error(tmp_path, capsys):
    src, _ = make_shenzhen(tmp_path, ["CHNCXR_0001_0"], [])
    empty = tmp_path / "empty"
    empty.mkdir()
    status = prepare_data.main(["shenzhen", "--src", str(src), "--masks", str(empty),
                                "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "_mask.png" in err


# --------------------------------------------------------------------------- helpers


def test_save_png_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    prepare_data.save_png(np.zeros((4, 4), np.uint8), target)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        prepare_data.save_png(np.ones((4, 4), np.uint8), target)
    assert read(target).max() == 0  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left behind
