"""Shared test set-up: the bundle's code on sys.path and access to the real data in ../shared/data."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))

sys.path.insert(0, str(BUNDLE))


def shared_dataset(name: str) -> Path:
    """Path of ../shared/data/<name>; fails under CI (CI is set) and skips elsewhere when it is missing."""
    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        message = f"real data {path} is missing (set CXR_SHARED_DATA to the folder holding {name}/)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def montgomery() -> Path:
    return shared_dataset("montgomery")


@pytest.fixture
def jsrt_scr() -> Path:
    return shared_dataset("jsrt_scr")


@pytest.fixture
def shenzhen() -> Path:
    return shared_dataset("shenzhen")


@pytest.fixture
def small_montgomery(montgomery: Path, tmp_path: Path) -> Path:
    """A copy of the first 8 Montgomery image/mask pairs in the dataset layout (kept in tmp_path only)."""
    import shutil

    out = tmp_path / "montgomery_small"
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True)
    for image in sorted((montgomery / "images").glob("*.png"))[:8]:
        shutil.copy(image, out / "images" / image.name)
        shutil.copy(montgomery / "masks" / image.name, out / "masks" / image.name)
    return out


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Inference workflows set torch's CPU threads for their run (network_threads); give later tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
