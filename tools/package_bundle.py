#!/usr/bin/env python
"""Package the bundle as a MONAI Model Zoo style release: ``dist/<name>_v<version>.zip`` and, on request, the
same tree as a folder (the zoo's ``models/<name>/``) and as a Hugging Face Hub upload folder.

    python tools/package_bundle.py                          # bundle/ -> dist/cxr_segmentation_v0.6.0.zip
    python tools/package_bundle.py --folder --hf_folder     # + dist/cxr_segmentation/ and
                                                            #   dist/huggingface/cxr_segmentation/
    python tools/package_bundle.py --write_large_files      # (re)write bundle/large_files.yml from bundle/models/

The archive holds one top folder, ``<name>/`` (what ``python -m monai.bundle download --name <name>``
expects), and is byte-for-byte reproducible: entries sorted, every timestamp 2022-05-30 00:00 (the zoo
release pipeline's ``touch -t 202205300000``), permissions 644 for files and 755 for folders, no extra
fields. Only the bundle's own parts go in:

- ``LICENSE``, ``configs/``, ``docs/``, ``scripts/`` (without ``__pycache__``/``*.pyc``, hidden files or the
  ``configs/*_override.json`` files that the zoo's multi-GPU tests write), and ``large_files.yml``;
- ``models/model*.pt|ts|onnx`` (the weights) and ``models/qc_model.npz`` (inference's quality-control model);
  resumable ``checkpoint_*.pt`` files are left out;
- nothing else at the top of the bundle: ``runs/``, ``eval/`` and other outputs are skipped, and image or
  volume files (data) are refused outside ``docs/``.

Weights and ``large_files.yml``. ``bundle/large_files.yml`` lists every weight file (``models/model*.pt``,
``models/qc_model.npz``) with the URL it is
published at (the Hub repository's file at the version's tag) and its sha256, the zoo's ``large_files``
format. The build checks it against the weights in ``models/``: a weight file that is not listed, or whose
sha256 differs, stops the build (``--write_large_files`` rewrites the list). A listed file that is not in
``models/`` (a checkout without the weights) is fetched from its URL and checked with ``--fetch_large_files``;
without it the release is built without that file, and users fetch it after downloading with

    python -m monai.bundle download_large_files --bundle_path <bundle_dir>/<name>

Files over ``--max_file_mb`` (25 MB, the zoo limit) never go into the archive: listed ones are left out, and
others need ``--large_files_url`` (where they will be uploaded): they are then added to the archive's
``large_files.yml`` and copied to ``dist/large_files/`` for the upload.

``--hf_folder`` writes what ``python -m monai.bundle push_to_hf_hub --bundle_dir dist/huggingface`` uploads:
the release tree with every weight file, plus the model card ``README.md`` (``docs/README.md`` under the tags
that ``push_to_hf_hub`` adds); no runs, evaluation output or checkpoints.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parents[1]
DATE_TIME = (2022, 5, 30, 0, 0, 0)  # zoo: touch -t 202205300000
FILE_MODE = 0o100644
DIR_MODE = 0o040755
LARGE_FILES_NAME = "large_files.yml"
TOP_LEVEL = {"LICENSE", "configs", "docs", "models", "scripts"}  # and large_files.yml; everything else is skipped
MODEL_PATTERNS = ("model*.pt", "model*.ts", "model*.onnx", "qc_model.npz")  # qc: inference's quality-control model
WEIGHT_PATTERNS = ("model*.pt", "qc_model.npz")  # what large_files.yml must list (exports are made from these)
SKIP_NAMES = ("__pycache__", "*.pyc", "*.pyo", "*~", ".*", "*.swp")
SKIP_CONFIGS = ("*_override.json",)  # written into configs/ by the zoo's multi-GPU unit tests
DATA_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz",
                 ".nrrd", ".mha", ".mhd", ".npy", ".npz", ".h5", ".hdf5")
HF_REPO = "MONAI/cxr_segmentation"  # the zoo's Hub organisation; --hf_repo for another one
HF_TAGS = "---\ntags:\n- monai\n- medical\nlibrary_name: monai\nlicense: {license}\n---"  # as push_to_hf_hub adds


def read_version(bundle_dir: Path) -> str:
    """The bundle's version, which must also be a key of its changelog."""
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    version = meta.get("version")
    if not version:
        raise SystemExit(f"{bundle_dir}/configs/metadata.json has no 'version'")
    if version not in meta.get("changelog", {}):
        raise SystemExit(f"version {version} is not a key of the changelog in configs/metadata.json")
    return version


def select_files(bundle_dir: Path) -> tuple[list[PurePosixPath], list[str]]:
    """Bundle files to archive (paths relative to bundle_dir, sorted) and a note per skipped entry.

    large_files.yml is not among them: build() writes it (checked, and with any entries it adds)."""
    chosen, skipped = [], []
    for top in sorted(os.listdir(bundle_dir)):
        if top not in TOP_LEVEL:
            if top != LARGE_FILES_NAME:
                skipped.append(top)
            continue
        if (bundle_dir / top).is_file():
            chosen.append(PurePosixPath(top))
            continue
        for root, dirs, files in os.walk(bundle_dir / top):
            dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in SKIP_NAMES))
            for name in sorted(files):
                path = Path(root, name)
                rel = PurePosixPath(path.relative_to(bundle_dir).as_posix())
                if any(fnmatch.fnmatch(name, p) for p in SKIP_NAMES):
                    continue
                if top == "configs" and any(fnmatch.fnmatch(name, p) for p in SKIP_CONFIGS):
                    skipped.append(str(rel))
                    continue
                if path.is_symlink() or not path.is_file():
                    raise SystemExit(f"{path}: links and special files are not packaged")
                if top == "models" and not any(fnmatch.fnmatch(name, p) for p in MODEL_PATTERNS):
                    skipped.append(str(rel))
                    continue
                if top not in ("docs", "models") and name.lower().endswith(DATA_SUFFIXES):
                    raise SystemExit(f"{path}: image/volume data must not be packaged (only figures in docs/)")
                chosen.append(rel)
    return sorted(chosen), skipped


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_url(version: str, hf_repo: str = HF_REPO) -> str:
    """Where the Hub serves the files of ``hf_repo`` at the tag ``version`` (push_to_hf_hub --version)."""
    return f"https://huggingface.co/{hf_repo}/resolve/{version}"


def weight_files(bundle_dir: Path) -> list[str]:
    """models/model*.pt and models/qc_model.npz in the bundle, as paths relative to it."""
    models = bundle_dir / "models"
    if not models.is_dir():
        return []
    return sorted(f"models/{p.name}" for p in models.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in WEIGHT_PATTERNS))


def large_files_yaml(entries: list[dict]) -> bytes:
    """The zoo's large_files.yml: a `large_files` list of path, url, hash_val, hash_type."""
    lines = ["large_files:"]
    for e in entries:
        lines += [f'  - path: "{e["path"]}"', f'    url: "{e["url"]}"',
                  f'    hash_val: "{e["hash_val"]}"', f'    hash_type: "{e["hash_type"]}"']
    return ("\n".join(lines) + "\n").encode()


def read_large_files(bundle_dir: Path) -> list[dict]:
    """The entries of bundle_dir/large_files.yml ([] without one), each checked for form."""
    path = bundle_dir / LARGE_FILES_NAME
    if not path.is_file():
        return []
    entries = (yaml.safe_load(path.read_text()) or {}).get("large_files") or []
    for e in entries:
        rel = PurePosixPath(str(e.get("path", "")))
        if not e.get("path") or rel.is_absolute() or ".." in rel.parts:
            raise SystemExit(f"{path}: bad path {e.get('path')!r} (relative to the bundle, inside it)")
        if not str(e.get("url", "")).startswith(("https://", "http://")):
            raise SystemExit(f"{path}: {rel} has no http(s) url")
        if e.get("hash_type") != "sha256" or len(str(e.get("hash_val", ""))) != 64:
            raise SystemExit(f"{path}: {rel} needs hash_type sha256 and its 64-digit hash_val")
    return entries


def write_large_files(bundle_dir: Path = REPO / "bundle", base_url: str | None = None) -> Path:
    """(Re)write bundle_dir/large_files.yml: every weight file with its sha256 and ``base_url/<path>``
    (default: the Hub repository at this version's tag). Run it after training new weights."""
    base_url = (base_url or hub_url(read_version(bundle_dir))).rstrip("/")
    entries = [{"path": rel, "url": f"{base_url}/{rel}", "hash_val": sha256(bundle_dir / rel), "hash_type": "sha256"}
               for rel in weight_files(bundle_dir)]
    if not entries:
        raise SystemExit(f"no weights (models/model*.pt, qc_model.npz) in {bundle_dir} to list")
    path = bundle_dir / LARGE_FILES_NAME
    path.write_bytes(large_files_yaml(entries))
    return path


def check_large_files(bundle_dir: Path, entries: list[dict]) -> None:
    """Every weight file in models/ is listed, and every listed file that is present has the listed sha256."""
    listed = {e["path"] for e in entries}
    unlisted = [rel for rel in weight_files(bundle_dir) if rel not in listed]
    if entries and unlisted:
        raise SystemExit(f"{', '.join(unlisted)} not in {LARGE_FILES_NAME}: run tools/package_bundle.py "
                         "--write_large_files")
    for e in entries:
        path = bundle_dir / e["path"]
        if path.is_file() and sha256(path) != e["hash_val"]:
            raise SystemExit(f"{e['path']} does not match its sha256 in {LARGE_FILES_NAME} (stale list, or "
                             "wrong weights): run tools/package_bundle.py --write_large_files after training")


def fetch(entry: dict, target: Path) -> Path:
    """Download entry['url'] to target (kept when it is already there with the right hash) and check its sha256."""
    if target.is_file() and sha256(target) == entry["hash_val"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(entry["url"], timeout=60) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f)
    if sha256(partial) != entry["hash_val"]:
        partial.unlink()
        raise SystemExit(f"{entry['url']}: sha256 differs from {LARGE_FILES_NAME}'s {entry['hash_val']}")
    os.replace(partial, target)
    return target


def model_card(bundle_dir: Path) -> bytes:
    """README.md of the Hub repository: docs/README.md under the tags that push_to_hf_hub puts there."""
    licence = (bundle_dir / "LICENSE").read_text()
    name = "apache-2.0" if "Apache License" in licence and "Version 2.0" in licence else \
        "mit" if "MIT License" in licence else "unknown"
    return (HF_TAGS.format(license=name) + "\n" + (bundle_dir / "docs" / "README.md").read_text()).encode()


def _dir_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name.rstrip("/") + "/", date_time=DATE_TIME)
    info.create_system = 3  # unix, so that the mode bits are read back
    info.external_attr = (DIR_MODE << 16) | 0x10  # 0x10: MS-DOS directory flag
    return info


def _file_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=DATE_TIME)
    info.create_system = 3
    info.external_attr = FILE_MODE << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _write_tree(contents: dict[str, bytes | Path], folder: Path) -> None:
    """contents as files under folder (emptied first), modes 644/755 as in the zip."""
    if folder.exists():
        shutil.rmtree(folder)
    for rel, src in sorted(contents.items()):
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
        dst.chmod(0o644)
    for root, dirs, _ in os.walk(folder):
        for d in dirs:
            Path(root, d).chmod(0o755)
    folder.chmod(0o755)


def build(bundle_dir: Path = REPO / "bundle", output_dir: Path = REPO / "dist", name: str = "cxr_segmentation",
          max_file_mb: float = 25.0, large_files_url: str | None = None, allow_missing_weights: bool = False,
          fetch_large_files: bool = False, folder: bool = False, hf_folder: bool = False) -> Path:
    """Write output_dir/<name>_v<version>.zip from bundle_dir and return its path (see the module's text);
    folder: also output_dir/<name>/, hf_folder: also output_dir/huggingface/<name>/."""
    bundle_dir, output_dir = Path(bundle_dir), Path(output_dir)
    version = read_version(bundle_dir)
    for required in ("LICENSE", "configs/metadata.json"):
        if not (bundle_dir / required).is_file():
            raise SystemExit(f"{bundle_dir / required} is missing: a bundle needs it")
    listed = read_large_files(bundle_dir)
    check_large_files(bundle_dir, listed)

    files, skipped = select_files(bundle_dir)
    sources: dict[str, Path] = {str(rel): bundle_dir / rel for rel in files}
    absent = [e for e in listed if e["path"] not in sources]  # listed, not in this checkout
    if fetch_large_files:
        for e in absent:
            sources[e["path"]] = fetch(e, output_dir / "large_files_cache" / e["path"])
        absent = []
    if "models/model.pt" not in sources and not any(e["path"] == "models/model.pt" for e in listed) \
            and not allow_missing_weights:
        raise SystemExit(f"{bundle_dir}/models/model.pt is missing (--allow_missing_weights to package anyway)")
    if hf_folder and absent:
        raise SystemExit(f"the Hub folder needs every weight file, missing: {', '.join(e['path'] for e in absent)} "
                         "(--fetch_large_files fetches them from large_files.yml)")

    limit = int(max_file_mb * 1024 * 1024)
    entries, new_entries = list(listed), []
    too_big = sorted(rel for rel, src in sources.items() if src.stat().st_size > limit)
    unlisted_big = [rel for rel in too_big if rel not in {e["path"] for e in listed}]
    if unlisted_big:
        if not large_files_url:
            raise SystemExit(f"over {max_file_mb} MB, not allowed in the archive: {', '.join(unlisted_big)}; "
                             "give --large_files_url (where they will be uploaded) to list them in large_files.yml")
        for rel in unlisted_big:
            new_entries.append({"path": rel, "url": f"{large_files_url.rstrip('/')}/{rel}",
                                "hash_val": sha256(sources[rel]), "hash_type": "sha256"})
        entries += new_entries
    release: dict[str, bytes | Path] = {rel: src for rel, src in sources.items() if rel not in too_big}
    if entries:
        release[LARGE_FILES_NAME] = large_files_yaml(entries)

    dirs = {name}
    for rel in release:
        for parent in PurePosixPath(name, rel).parents:
            if str(parent) != ".":
                dirs.add(str(parent))
    zip_entries = sorted([(d + "/", None) for d in dirs] + [(f"{name}/{rel}", src) for rel, src in release.items()])

    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{name}_v{version}.zip"
    partial = target.with_suffix(".zip.part")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for arcname, src in zip_entries:
            if src is None:
                zf.writestr(_dir_entry(arcname), b"")
            else:
                data = src if isinstance(src, bytes) else Path(src).read_bytes()
                zf.writestr(_file_entry(arcname), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(partial, target)

    if new_entries:
        (output_dir / LARGE_FILES_NAME).write_bytes(release[LARGE_FILES_NAME])
        for e in new_entries:
            dst = output_dir / "large_files" / e["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sources[e["path"]], dst)
    if folder:  # the zip's tree, as the zoo's models/<name>/ (and `monai.bundle download`) has it
        _write_tree(release, output_dir / name)
    if hf_folder:  # everything push_to_hf_hub uploads: the weights too (the Hub serves large_files.yml's URLs)
        _write_tree({**release, **sources, "README.md": model_card(bundle_dir)}, output_dir / "huggingface" / name)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    for e in absent:
        print(f"not in the release (fetch with download_large_files): {e['path']}", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle_dir", type=Path, default=REPO / "bundle", help="the bundle folder (default bundle/)")
    parser.add_argument("--output_dir", type=Path, default=REPO / "dist", help="where the zip goes (default dist/)")
    parser.add_argument("--name", default="cxr_segmentation", help="bundle name: top folder and zip name")
    parser.add_argument("--max_file_mb", type=float, default=25.0, help="largest file allowed in the zip")
    parser.add_argument("--large_files_url", help="URL prefix the unlisted files over the limit will be uploaded under")
    parser.add_argument("--allow_missing_weights", action="store_true", help="package without models/model.pt")
    parser.add_argument("--fetch_large_files", action="store_true",
                        help="download the files of large_files.yml that bundle/models lacks (sha256 checked)")
    parser.add_argument("--folder", action="store_true", help="also write the release as <output_dir>/<name>/")
    parser.add_argument("--hf_folder", action="store_true",
                        help="also write <output_dir>/huggingface/<name>: what push_to_hf_hub uploads")
    parser.add_argument("--write_large_files", action="store_true",
                        help="only (re)write <bundle_dir>/large_files.yml from the weights in models/, then stop")
    parser.add_argument("--hf_repo", default=HF_REPO, help="with --write_large_files: the Hub repository of the URLs")
    args = parser.parse_args(argv)
    if args.write_large_files:
        base = args.large_files_url or hub_url(read_version(args.bundle_dir), args.hf_repo)
        print(write_large_files(args.bundle_dir, base))
        return
    print(build(args.bundle_dir, args.output_dir, args.name, args.max_file_mb, args.large_files_url,
                args.allow_missing_weights, args.fetch_large_files, args.folder, args.hf_folder))


if __name__ == "__main__":
    main()
