"""Data lists: pairing images with masks, the seeded per-dataset split, and errors naming the file."""

import numpy as np
import pytest
from PIL import Image

from scripts.data import DatasetError, split_datalist


def _make_set(root, n, size=(32, 32), mask_size=None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full(size, i, np.uint8)).save(root / "images" / f"case{i:03d}.png")
        Image.fromarray(np.zeros(mask_size or size, np.uint8)).save(root / "masks" / f"case{i:03d}.png")
    return root


def test_split_is_seeded_per_dataset_and_disjoint(tmp_path):
    a, b = _make_set(tmp_path / "a", 10), _make_set(tmp_path / "b", 20)
    split = split_datalist([str(a), str(b)], val_fraction=0.2, seed=3)
    assert len(split["validation"]) == 2 + 4 and len(split["training"]) == 8 + 16
    val = {d["image"] for d in split["validation"]}
    assert not val & {d["image"] for d in split["training"]}
    assert sum(d["dataset"] == "a" for d in split["validation"]) == 2
    assert split == split_datalist([str(a), str(b)], val_fraction=0.2, seed=3)
    assert val != {d["image"] for d in split_datalist([str(a), str(b)], 0.2, seed=4)["validation"]}
    for d in split["training"]:
        assert d["label"].replace("masks", "images") == d["image"]


def test_folds_partition_every_set_and_fold_0_is_the_default_split(tmp_path):
    a, b = _make_set(tmp_path / "a", 13), _make_set(tmp_path / "b", 21)
    folds = [split_datalist([str(a), str(b)], val_fraction=0.2, seed=3, fold=k) for k in range(5)]
    assert folds[0] == split_datalist([str(a), str(b)], val_fraction=0.2, seed=3)
    validated = [d["image"] for f in folds for d in f["validation"]]
    assert len(validated) == len(set(validated)) == 13 + 21   # every image validated exactly once
    for f in folds:
        assert not {d["image"] for d in f["validation"]} & {d["image"] for d in f["training"]}
        assert len(f["validation"]) + len(f["training"]) == 13 + 21
        assert {d["dataset"] for d in f["validation"]} == {"a", "b"}
    with pytest.raises(DatasetError, match="fold must be in 0..4"):
        split_datalist(str(a), val_fraction=0.2, fold=5)


def test_mask_subfolder_entry(tmp_path):
    root = _make_set(tmp_path / "jsrt", 5)
    (root / "structures" / "lungs").mkdir(parents=True)
    for p in (root / "masks").iterdir():
        (root / "structures" / "lungs" / p.name).write_bytes(p.read_bytes())
    split = split_datalist({"dir": str(root), "masks": "structures/lungs"}, 0.2, 0)
    assert all("structures/lungs" in d["label"] for d in split["training"] + split["validation"])


def test_missing_mask_names_the_image(tmp_path):
    root = _make_set(tmp_path / "s", 4)
    (root / "masks" / "case002.png").unlink()
    with pytest.raises(DatasetError, match=r"case002\.png: no mask"):
        split_datalist(str(root))


def test_size_mismatch_names_both_files(tmp_path):
    root = _make_set(tmp_path / "s", 3)
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(root / "masks" / "case001.png")
    with pytest.raises(DatasetError, match=r"case001\.png: image is \(32, 32\).*\(16, 32\)"):
        split_datalist(str(root))


def test_empty_folder_and_missing_folder(tmp_path):
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        split_datalist(str(tmp_path / "e"))
    with pytest.raises(DatasetError, match="no such folder"):
        split_datalist(str(tmp_path / "nowhere"))


def test_real_montgomery_split(montgomery):
    split = split_datalist(str(montgomery), val_fraction=0.2, seed=0)
    assert len(split["training"]) + len(split["validation"]) == 103
    assert len(split["validation"]) == 21
