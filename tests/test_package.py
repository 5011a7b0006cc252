"""tools/package_bundle.py: a reproducible zoo-style zip that MONAI's `download` fetches and that then runs.

The downloaded bundle is trained (1 epoch, 64 x 64, 8 Montgomery images) and, when the bundle has an
inference config, run on 2 images: from a working directory outside the repository, with nothing of the
repository on the Python path.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import BUNDLE, REPO

sys.path.insert(0, str(REPO / "tools"))
import package_bundle  # noqa: E402

sys.path.remove(str(REPO / "tools"))

NAME = "cxr_segmentation"
VERSION = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
ZIP_NAME = f"{NAME}_v{VERSION}.zip"
HAS_WEIGHTS = (BUNDLE / "models" / "model.pt").is_file()  # until the lead commits it, package without


def build(output_dir: Path, bundle_dir: Path = BUNDLE, **kwargs) -> Path:
    return package_bundle.build(bundle_dir, output_dir, NAME, allow_missing_weights=not HAS_WEIGHTS, **kwargs)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("dist"))


@pytest.fixture
def http_root(tmp_path):
    """A static HTTP server on 127.0.0.1 (ephemeral port) over a tmp folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def clean_env() -> dict:
    """The environment of a user's shell: no repository path, no proxy for the local server."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONDONTWRITEBYTECODE="1")
    return env


def bundle_cli(*args: str, cwd: Path, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=clean_env(),
                            capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"monai.bundle {args[0]} failed:\n{log[-4000:]}"
    return log


# ---- the archive -----------------------------------------------------------------------------------


def test_zip_is_reproducible(package, tmp_path):
    again = build(tmp_path)
    assert package.name == again.name == ZIP_NAME
    assert package.read_bytes() == again.read_bytes(), "two builds of the same tree differ"


def test_zip_layout_is_clean(package):
    with zipfile.ZipFile(package) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert {n.split("/")[0] for n in names} == {NAME}, "more than one top folder"
    for need in ("LICENSE", "configs/metadata.json", "configs/train.yaml", "docs/README.md", "scripts/__init__.py"):
        assert f"{NAME}/{need}" in names
    if HAS_WEIGHTS:
        assert f"{NAME}/models/model.pt" in names
    for info in infos:
        parts = info.filename.rstrip("/").split("/")
        assert info.date_time == (2022, 5, 30, 0, 0, 0), info.filename
        assert not any(p == "__pycache__" or p.startswith(".") for p in parts), info.filename
        assert not info.filename.endswith((".pyc", ".pyo")), info.filename
        assert parts[1:2] in ([], ["LICENSE"], ["configs"], ["docs"], ["models"], ["scripts"]), info.filename
        if len(parts) > 2 and parts[1] == "models":
            assert parts[-1].startswith("model"), f"not a model file: {info.filename}"  # no checkpoint_*.pt
        if parts[1:2] != ["docs"]:
            assert not info.filename.lower().endswith(package_bundle.DATA_SUFFIXES), f"data? {info.filename}"
        mode = stat.S_IMODE(info.external_attr >> 16)
        assert mode == (0o755 if info.is_dir() else 0o644), f"{info.filename}: {oct(mode)}"
        assert info.file_size <= 25 * 1024 * 1024, info.filename
    assert f"{NAME}/large_files.yml" not in names  # nothing is over 25 MB


def test_outputs_caches_and_checkpoints_stay_out(tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for junk in ("runs/events.out.tfevents.1", "eval/results.csv", "scripts/__pycache__/x.cpython-311.pyc",
                 "models/checkpoint_epoch=3.pt", "configs/.train.yaml.swp"):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_bytes(b"x")
    (copy / "models" / "model.pt").write_bytes(b"weights")
    with zipfile.ZipFile(build(tmp_path / "dist", copy)) as zf:
        names = set(zf.namelist())
    assert f"{NAME}/models/model.pt" in names
    parts = {p for n in names for p in n.rstrip("/").split("/")}
    assert not parts & {"runs", "eval", "__pycache__", "checkpoint_epoch=3.pt", ".train.yaml.swp"}, sorted(names)
    (copy / "scripts" / "leak.png").write_bytes(b"png")  # an image among the code is refused
    with pytest.raises(SystemExit, match="data must not be packaged"):
        build(tmp_path / "dist", copy)


def test_large_files_go_to_large_files_yml_and_download_back(tmp_path, http_root):
    from monai.bundle import download_large_files
    from monai.bundle.config_parser import ConfigParser

    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models"))
    (copy / "models").mkdir()
    weights = os.urandom(300_000)
    (copy / "models" / "model.pt").write_bytes(weights)
    with pytest.raises(SystemExit, match="--large_files_url"):
        build(tmp_path / "refused", copy, max_file_mb=0.2)  # too big and nowhere to put it

    www, url = http_root
    target = build(tmp_path / "dist", copy, max_file_mb=0.2, large_files_url=f"{url}/weights")
    with zipfile.ZipFile(target) as zf:
        names = set(zf.namelist())
        listed = zf.read(f"{NAME}/large_files.yml").decode()
        zf.extractall(tmp_path / "unzipped")
    assert f"{NAME}/models/model.pt" not in names and f"{NAME}/large_files.yml" in names
    entry = ConfigParser.load_config_file(str(tmp_path / "unzipped" / NAME / "large_files.yml"))["large_files"]
    assert entry == [{"path": "models/model.pt", "url": f"{url}/weights/models/model.pt",
                      "hash_val": hashlib.sha256(weights).hexdigest(), "hash_type": "sha256"}], listed
    assert (tmp_path / "dist" / "large_files" / "models" / "model.pt").read_bytes() == weights  # to upload

    shutil.copytree(tmp_path / "dist" / "large_files", www / "weights")
    download_large_files(bundle_path=str(tmp_path / "unzipped" / NAME))  # what users run after download
    assert (tmp_path / "unzipped" / NAME / "models" / "model.pt").read_bytes() == weights


# ---- download, then train and infer outside the repository --------------------------------------------


def test_download_train_and_infer_outside_the_repository(package, http_root, small_montgomery, tmp_path):
    www, url = http_root
    shutil.copy(package, www / ZIP_NAME)
    work = tmp_path / "work"  # the working directory: outside the repository, nothing of it on the path
    work.mkdir()
    downloads = tmp_path / "downloads"
    bundle_cli("download", "--name", NAME, "--bundle_dir", str(downloads), "--url", f"{url}/{ZIP_NAME}", cwd=work)
    root = downloads / NAME
    with zipfile.ZipFile(package) as zf:
        for name in zf.namelist():
            if not name.endswith("/"):
                assert (downloads / name).read_bytes() == zf.read(name), name

    log = bundle_cli("run", "training", "--bundle_root", str(root), "--config_file", str(root / "configs/train.yaml"),
                     "--dataset_dir", str(small_montgomery), "--max_epochs", "1", "--spatial_size", "[64,64]",
                     "--batch_size", "4", "--num_workers", "0", "--progress", "False", cwd=work)
    assert "Epoch[1] Complete" in log
    assert (root / "models" / "model.pt").is_file()  # default ckpt_dir: the bundle's models/
    assert any((root / "runs").glob("events.out.tfevents.*"))

    if not (root / "configs" / "inference.yaml").is_file():
        return
    images = tmp_path / "two"
    images.mkdir()
    for image in sorted((small_montgomery / "images").iterdir())[:2]:
        shutil.copy(image, images / image.name)
    out = tmp_path / "out"
    bundle_cli("run", "inference", "--bundle_root", str(root), "--config_file", str(root / "configs/inference.yaml"),
               "--input_dir", str(images), "--output_dir", str(out), "--spatial_size", "[64,64]",
               "--num_workers", "0", "--progress", "False", cwd=work)
    for image in images.iterdir():
        assert (out / f"{image.stem}_seg.png").is_file(), sorted(os.listdir(out))
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",ok," in row for row in rows[1:]), rows
