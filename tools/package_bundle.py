#!/usr/bin/env python
"""Package the bundle as a MONAI Model Zoo style archive: ``dist/<name>_v<version>.zip``.

    python tools/package_bundle.py                  # bundle/ -> dist/cxr_segmentation_v0.4.0.zip

The archive holds one top folder, ``<name>/`` (what ``python -m monai.bundle download --name <name>``
expects), and is byte-for-byte reproducible: entries sorted, every timestamp 2022-05-30 00:00 (the zoo
release pipeline's ``touch -t 202205300000``), permissions 644 for files and 755 for folders, no extra
fields. Only the bundle's own parts go in:

- ``LICENSE``, ``configs/``, ``docs/``, ``scripts/`` (without ``__pycache__``/``*.pyc`` or hidden files);
- ``models/model*.pt|ts|onnx`` (the weights; resumable ``checkpoint_*.pt`` files are left out);
- nothing else at the top of the bundle: ``runs/``, ``eval/`` and other outputs are skipped, and image or
  volume files (data) are refused outside ``docs/``.

Files over ``--max_file_mb`` (25 MB, the zoo limit) cannot go into the archive. Give ``--large_files_url``,
the address the weights will be uploaded to, and they are left out, copied to ``dist/large_files/`` for
the upload, and listed with their sha256 in a ``large_files.yml`` written into the archive (and next to
it in ``dist/``); nothing is written when no file is too big. After downloading, users fetch them with

    python -m monai.bundle download_large_files --bundle_path <bundle_dir>/<name>
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
DATE_TIME = (2022, 5, 30, 0, 0, 0)  # zoo: touch -t 202205300000
FILE_MODE = 0o100644
DIR_MODE = 0o040755
TOP_LEVEL = {"LICENSE", "configs", "docs", "models", "scripts"}  # everything else in the bundle is skipped
MODEL_PATTERNS = ("model*.pt", "model*.ts", "model*.onnx")
SKIP_NAMES = ("__pycache__", "*.pyc", "*.pyo", "*~", ".*", "*.swp")
DATA_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz",
                 ".nrrd", ".mha", ".mhd", ".npy", ".npz", ".h5", ".hdf5")
LARGE_FILES_NAME = "large_files.yml"


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
    """Bundle files to archive (paths relative to bundle_dir, sorted) and a note per skipped top-level entry."""
    chosen, skipped = [], []
    for top in sorted(os.listdir(bundle_dir)):
        if top not in TOP_LEVEL:
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
                if path.is_symlink() or not path.is_file():
                    raise SystemExit(f"{path}: links and special files are not packaged")
                if top == "models" and not any(fnmatch.fnmatch(name, p) for p in MODEL_PATTERNS):
                    skipped.append(str(rel))
                    continue
                if top != "docs" and name.lower().endswith(DATA_SUFFIXES):
                    raise SystemExit(f"{path}: image/volume data must not be packaged (only figures in docs/)")
                chosen.append(rel)
    return sorted(chosen), skipped


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files_yaml(entries: list[dict]) -> bytes:
    """The zoo's large_files.yml: a `large_files` list of path, url, hash_val, hash_type."""
    lines = ["large_files:"]
    for e in entries:
        lines += [f'  - path: "{e["path"]}"', f'    url: "{e["url"]}"',
                  f'    hash_val: "{e["hash_val"]}"', f'    hash_type: "{e["hash_type"]}"']
    return ("\n".join(lines) + "\n").encode()


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


def build(bundle_dir: Path = REPO / "bundle", output_dir: Path = REPO / "dist", name: str = "cxr_segmentation",
          max_file_mb: float = 25.0, large_files_url: str | None = None, allow_missing_weights: bool = False) -> Path:
    """Write output_dir/<name>_v<version>.zip from bundle_dir and return its path."""
    bundle_dir, output_dir = Path(bundle_dir), Path(output_dir)
    version = read_version(bundle_dir)
    for required in ("LICENSE", "configs/metadata.json"):
        if not (bundle_dir / required).is_file():
            raise SystemExit(f"{bundle_dir / required} is missing: a bundle needs it")
    if not (bundle_dir / "models" / "model.pt").is_file() and not allow_missing_weights:
        raise SystemExit(f"{bundle_dir}/models/model.pt is missing (--allow_missing_weights to package anyway)")

    files, skipped = select_files(bundle_dir)
    limit = int(max_file_mb * 1024 * 1024)
    large = [rel for rel in files if (bundle_dir / rel).stat().st_size > limit]
    large_entries = []
    if large:
        if not large_files_url:
            raise SystemExit(f"over {max_file_mb} MB, not allowed in the archive: {', '.join(map(str, large))}; "
                             "give --large_files_url (where they will be uploaded) to list them in large_files.yml")
        for rel in large:
            large_entries.append({"path": str(rel), "url": f"{large_files_url.rstrip('/')}/{rel}",
                                  "hash_val": sha256(bundle_dir / rel), "hash_type": "sha256"})
        files = [rel for rel in files if rel not in large]

    contents: dict[str, bytes | Path] = {str(rel): bundle_dir / rel for rel in files}
    if large_entries:
        contents[LARGE_FILES_NAME] = large_files_yaml(large_entries)

    dirs = {name}
    for rel in contents:
        for parent in PurePosixPath(name, rel).parents:
            if str(parent) != ".":
                dirs.add(str(parent))
    entries = sorted([(d + "/", None) for d in dirs] + [(f"{name}/{rel}", src) for rel, src in contents.items()])

    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{name}_v{version}.zip"
    partial = target.with_suffix(".zip.part")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for arcname, src in entries:
            if src is None:
                zf.writestr(_dir_entry(arcname), b"")
            else:
                data = src if isinstance(src, bytes) else Path(src).read_bytes()
                zf.writestr(_file_entry(arcname), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(partial, target)

    if large_entries:
        (output_dir / LARGE_FILES_NAME).write_bytes(contents[LARGE_FILES_NAME])
        for e in large_entries:
            dst = output_dir / "large_files" / e["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle_dir / e["path"], dst)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle_dir", type=Path, default=REPO / "bundle", help="the bundle folder (default bundle/)")
    parser.add_argument("--output_dir", type=Path, default=REPO / "dist", help="where the zip goes (default dist/)")
    parser.add_argument("--name", default="cxr_segmentation", help="bundle name: top folder and zip name")
    parser.add_argument("--max_file_mb", type=float, default=25.0, help="largest file allowed in the zip")
    parser.add_argument("--large_files_url", help="URL prefix the files over the limit will be uploaded under")
    parser.add_argument("--allow_missing_weights", action="store_true", help="package without models/model.pt")
    args = parser.parse_args(argv)
    print(build(args.bundle_dir, args.output_dir, args.name, args.max_file_mb, args.large_files_url,
                args.allow_missing_weights))


if __name__ == "__main__":
    main()
