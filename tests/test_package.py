"""tools/package_bundle.py: a reproducible zoo-style zip that MONAI's `download` fetches and that then runs;
large_files.yml (every weight file with its URL and sha256) and a release built from a checkout without the
weights; the Hugging Face Hub upload folder, checked offline through MONAI's own push_to_hf_hub and
download --source huggingface_hub; the metadata's version pins against setup.cfg.

The downloaded bundle is trained (1 epoch, 64 x 64, 8 Montgomery images) and, when the bundle has an
inference config, run on 2 images: from a working directory outside the repository, with nothing of the
repository on the Python path.
"""

from __future__ import annotations

import configparser
import fnmatch
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
import types
import zipfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import metadata as dist_metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

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
        assert parts[1:2] in ([], ["LICENSE"], ["configs"], ["docs"], ["models"], ["scripts"], ["large_files.yml"]), \
            info.filename
        if len(parts) > 2 and parts[1] == "models":  # no checkpoint_*.pt
            assert any(fnmatch.fnmatch(parts[-1], p) for p in package_bundle.MODEL_PATTERNS), info.filename
        if parts[1:2] not in (["docs"], ["models"]):
            assert not info.filename.lower().endswith(package_bundle.DATA_SUFFIXES), f"data? {info.filename}"
        mode = stat.S_IMODE(info.external_attr >> 16)
        assert mode == (0o755 if info.is_dir() else 0o644), f"{info.filename}: {oct(mode)}"
        assert info.file_size <= 25 * 1024 * 1024, info.filename
    assert f"{NAME}/large_files.yml" in names  # every weight file's URL and sha256, nothing left out (< 25 MB)
    if HAS_WEIGHTS:
        assert {f"{NAME}/{rel}" for rel in package_bundle.weight_files(BUNDLE)} <= set(names)


def test_outputs_caches_and_checkpoints_stay_out(tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "eval", "models",
                                                                "large_files.yml"))
    for junk in ("runs/events.out.tfevents.1", "eval/results.csv", "scripts/__pycache__/x.cpython-311.pyc",
                 "models/checkpoint_epoch=3.pt", "configs/.train.yaml.swp", "configs/train_override.json"):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_bytes(b"x")
    (copy / "models" / "model.pt").write_bytes(b"weights")
    with zipfile.ZipFile(build(tmp_path / "dist", copy)) as zf:
        names = set(zf.namelist())
    assert f"{NAME}/models/model.pt" in names
    parts = {p for n in names for p in n.rstrip("/").split("/")}
    assert not parts & {"runs", "eval", "__pycache__", "checkpoint_epoch=3.pt", ".train.yaml.swp",
                        "train_override.json"}, sorted(names)
    (copy / "scripts" / "leak.png").write_bytes(b"png")  # an image among the code is refused
    with pytest.raises(SystemExit, match="data must not be packaged"):
        build(tmp_path / "dist", copy)


def test_large_files_go_to_large_files_yml_and_download_back(tmp_path, http_root):
    from monai.bundle import download_large_files
    from monai.bundle.config_parser import ConfigParser

    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models", "runs", "eval",
                                                                "large_files.yml"))
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


# ---- large_files.yml: every weight file, and a release from a checkout without the weights ----------


def test_large_files_yml_lists_every_weight_file_with_url_and_sha256():
    entries = package_bundle.read_large_files(BUNDLE)  # form checked: relative path, http(s) URL, sha256
    assert entries, "no bundle/large_files.yml: python tools/package_bundle.py --write_large_files"
    listed = {e["path"]: e for e in entries}
    if HAS_WEIGHTS:
        assert sorted(listed) == package_bundle.weight_files(BUNDLE), "tools/package_bundle.py --write_large_files"
    for rel, e in listed.items():
        assert e["url"].startswith("https://") and e["url"].endswith(f"/{rel}"), e
        if (BUNDLE / rel).is_file():
            assert package_bundle.sha256(BUNDLE / rel) == e["hash_val"], f"{rel} changed: --write_large_files"


def _bundle_copy(path: Path, weights: dict[str, bytes], url: str) -> Path:
    """The bundle without its outputs, with these models/ files listed in its large_files.yml under url."""
    shutil.copytree(BUNDLE, path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "eval", "models",
                                                                "large_files.yml"))
    (path / "models").mkdir()
    for name, data in weights.items():
        (path / "models" / name).write_bytes(data)
    package_bundle.write_large_files(path, url)
    return path


def test_release_builds_from_a_checkout_without_the_weights(tmp_path, http_root):
    """Weights listed in large_files.yml but not in the checkout: the release is built without them (users and
    the zoo's CI fetch them with download_large_files), or, with fetch_large_files, byte for byte the release
    of a checkout that has them. Weights that do not match the list stop the build."""
    from monai.bundle import download_large_files

    www, url = http_root
    weights = {"model.pt": os.urandom(2000), "model_anatomy.pt": os.urandom(3000)}
    full = _bundle_copy(tmp_path / "full", weights, f"{url}/hub")
    shutil.copytree(full / "models", www / "hub" / "models")  # where large_files.yml's URLs point
    bare = tmp_path / "bare"
    shutil.copytree(full, bare, ignore=shutil.ignore_patterns("models"))

    without = build(tmp_path / "without", bare)
    with zipfile.ZipFile(without) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "unzipped")
    assert f"{NAME}/large_files.yml" in names and not any(n.startswith(f"{NAME}/models/model") for n in names)
    download_large_files(bundle_path=str(tmp_path / "unzipped" / NAME))  # what users run after download
    for name, data in weights.items():
        assert (tmp_path / "unzipped" / NAME / "models" / name).read_bytes() == data

    fetched = build(tmp_path / "fetched", bare, fetch_large_files=True)
    assert fetched.read_bytes() == build(tmp_path / "from_full", full).read_bytes()

    (www / "hub" / "models" / "model_anatomy.pt").write_bytes(b"not the listed file")
    with pytest.raises(SystemExit, match="sha256 differs"):
        build(tmp_path / "tampered", bare, fetch_large_files=True)
    (full / "models" / "model.pt").write_bytes(b"retrained, list not updated")
    with pytest.raises(SystemExit, match="does not match its sha256"):
        build(tmp_path / "stale", full)
    (full / "models" / "model_new.pt").write_bytes(b"unlisted")
    with pytest.raises(SystemExit, match="not in large_files.yml"):
        build(tmp_path / "unlisted", full)


# ---- the Hugging Face Hub folder ------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_WEIGHTS, reason="bundle/models/model.pt is not there")
def test_hub_folder_is_what_push_to_hf_hub_uploads_and_download_brings_back(tmp_path, monkeypatch):
    """MONAI's own push_to_hf_hub and download --source huggingface_hub, with the huggingface_hub client
    replaced by a recorder (offline): the upload is the release plus its model card and the weights, nothing
    of a training run (runs/, eval/, checkpoints) in the bundle folder; the download then loads."""
    import monai.bundle.scripts as bundle_scripts
    import torch
    from monai.bundle import download, load, push_to_hf_hub

    copy = _bundle_copy(tmp_path / "bundle", {"model.pt": (BUNDLE / "models" / "model.pt").read_bytes()},
                        "https://huggingface.co/example/cxr_segmentation/resolve/v")
    for junk in ("runs/events.out.tfevents.1", "eval/results.csv", "models/checkpoint_epoch=3.pt",
                 "configs/train_override.json"):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_bytes(b"x")
    target = build(tmp_path / "dist", copy, hf_folder=True)
    folder = tmp_path / "dist" / "huggingface" / NAME
    card = (folder / "README.md").read_bytes()

    hub, sent = tmp_path / "hub", {}

    class HfApi:  # the calls push_to_hf_hub makes, recorded
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=True, exist_ok=False):
            sent["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, **kwargs):  # sends every file under folder_path
            sent["files"] = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                             for p in Path(folder_path).rglob("*") if p.is_file()}
            shutil.copytree(folder_path, hub)
            return f"https://huggingface.co/{repo_id}"

        def create_tag(self, repo_id, tag, exist_ok=False):
            sent.setdefault("tags", []).append(tag)

    def snapshot_download(repo_id, revision=None, local_dir=None):  # what download fetches from the Hub
        assert (repo_id, revision) == ("example/cxr_segmentation", VERSION)
        shutil.copytree(hub, local_dir)

    monkeypatch.setattr(bundle_scripts, "huggingface_hub", types.SimpleNamespace(
        HfApi=HfApi, snapshot_download=snapshot_download))
    push_to_hf_hub(repo="example/cxr_segmentation", name=NAME, bundle_dir=str(folder.parent), version=VERSION)

    with zipfile.ZipFile(target) as zf:
        released = {n.split("/", 1)[1] for n in zf.namelist() if not n.endswith("/")}
    assert set(sent["files"]) == released | {"README.md"}, sorted(sent["files"])
    assert "models/model.pt" in sent["files"] and "large_files.yml" in sent["files"]
    parts = {p for f in sent["files"] for p in f.split("/")}
    assert not parts & {"runs", "eval", "checkpoint_epoch=3.pt", "train_override.json"}, sorted(sent["files"])
    assert sent["files"]["README.md"] == card, "push_to_hf_hub wrote another model card"
    assert card.startswith(b"---\ntags:\n- monai\n- medical\nlibrary_name: monai\nlicense: apache-2.0\n---\n")
    assert sent["tags"] == [VERSION]

    bundles = tmp_path / "bundles"  # the users' side: the README's download command, then load
    download(name=NAME, source="huggingface_hub", repo="example/cxr_segmentation", version=VERSION,
             bundle_dir=str(bundles), progress=False)
    net = load(NAME, bundle_dir=str(bundles), workflow_type="inference", device="cpu", progress=False)
    shipped = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in shipped.items())


# ---- the bundle's README ------------------------------------------------------------------------------


def test_bundle_readme_stands_alone():
    """docs/README.md is read inside the downloaded bundle: no path outside it, every bundle path it names
    exists, its pip command installs the metadata's pins, and it has what the zoo asks of a README."""
    import re

    text = (BUNDLE / "docs" / "README.md").read_text()
    for outside in ("../", "bundle/", "data/", "bench/", "tools/", "tests/", "shared/"):  # as relative paths
        assert not re.search(r"(?<![\w/.])" + re.escape(outside), text), f"docs/README.md names {outside}"
    named = set(re.findall(r"`((?:configs|models|docs|scripts)/[^`*<> ]+)`", text))
    assert named and not [rel for rel in named if not (BUNDLE / rel).exists()]
    command = text[text.index("pip install"):text.index("```", text.index("pip install"))]
    assert dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\\]*)", command)) == _pins()
    for needed in ("### Authors", "## Limitations", "TensorRT", "from monai.bundle import load",
                   "--source huggingface_hub", "download_large_files"):
        assert needed in text, needed


# ---- version pins ---------------------------------------------------------------------------------------

LINUX_X86_64 = ("manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64",
                "linux_x86_64")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _requirements(text: str) -> dict[str, Requirement]:
    reqs = (Requirement(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {canonicalize_name(r.name): r for r in reqs}


def _pythons() -> list[str]:
    """The Python versions (3.x) that setup.cfg's python_requires allows."""
    allowed = SpecifierSet(_setup_cfg()["options"]["python_requires"])
    minors = [f"3.{m}" for m in range(60) if Version(f"3.{m}") in allowed]
    assert minors and minors[-1] != "3.59", "python_requires needs an upper bound: each version it allows is checked"
    return minors


def _pins() -> dict[str, str]:
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    return {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"],
            **meta["required_packages_version"]}


def test_metadata_pins_are_the_runtime_requirements_of_setup_cfg():
    """The pins (what the zoo's CI installs, `==` each) are exactly the runtime packages of setup.cfg's
    install_requires, each within its range; optional ones are in an extra; and every pinned release that is
    installed here declares support (Requires-Python) for every Python that setup.cfg allows."""
    cfg, pins = _setup_cfg(), _pins()
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert "optional_packages_version" not in meta  # MONAI >= 1.4 would put it in place of required_packages_version
    requires = _requirements(cfg["options"]["install_requires"])
    assert {canonicalize_name(n) for n in pins} == set(requires), "runtime packages only, all of them"
    for name, pin in pins.items():
        assert Version(pin) in requires[canonicalize_name(name)].specifier, f"{name}=={pin} vs setup.cfg"
    extras = {n for text in cfg["options.extras_require"].values() for n in _requirements(text)}
    assert {canonicalize_name(n) for n in meta["extra_packages_version"]} <= extras

    pythons = _pythons()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in pythons
    for name, pin in {**pins, **meta["extra_packages_version"]}.items():
        try:
            dist = dist_metadata(name)
        except PackageNotFoundError:
            continue
        if Version(dist["Version"]).public != Version(pin).public:
            continue  # another release is installed here: nothing to read about the pinned one
        supported = SpecifierSet(dist.get("Requires-Python") or "")
        assert all(f"{v}.0" in supported for v in pythons), f"{name}=={pin} requires Python {supported}"


@pytest.mark.skipif(not os.environ.get("CXR_CHECK_PINS_ONLINE"), reason="asks the package index (minutes): "
                    "set CXR_CHECK_PINS_ONLINE=1")
def test_metadata_pins_install_from_wheels_on_every_python_setup_cfg_allows(tmp_path):
    """pip resolves the zoo's requirement list (monai, torch, numpy and the pins, `==` each) from wheels for each
    Python version of setup.cfg, on Linux x86_64: each pin alone, then all but torch with their dependencies
    (torch's own CUDA dependencies are the index's business, not the bundle's)."""
    pins = _pins()
    platforms = [a for p in LINUX_X86_64 for a in ("--platform", p)]
    for python in _pythons():
        for together in (False, True):
            reqs = [f"{n}=={v}" for n, v in pins.items() if not (together and n == "torch")]
            cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
                   "--python-version", python, *platforms, "--target", str(tmp_path / "t"), *reqs]
            result = subprocess.run(cmd + ([] if together else ["--no-deps"]), capture_output=True, text=True)
            assert result.returncode == 0, f"Python {python}: {result.stdout[-1500:]}{result.stderr[-1500:]}"


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

    assert (root / "configs" / "inference.yaml").is_file(), "the downloaded bundle has no configs/inference.yaml"
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
