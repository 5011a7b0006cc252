"""Convert the official chest X-ray downloads into the layout the bundle reads.

Output layout (same as the shared development copies)::

    <out>/images/<stem>.png     grayscale PNG (8-bit by default, 16-bit with --bit-depth 16)
    <out>/masks/<stem>.png      uint8 label map: 0 background, 1 lungs, 2 heart, 3 clavicles
    <out>/manifest.csv          stem, group, width, height, labels_present
    <out>/structures/{lungs,heart,clavicles}/<stem>.png   (jsrt only) 0/1 masks, overlaps kept

Usage::

    python data/prepare_data.py montgomery --src MontgomerySet --out OUT [--size N]
    python data/prepare_data.py shenzhen --src ChinaSet_AllFiles --masks MASKDIR --out OUT [--size N]
    python data/prepare_data.py jsrt --images JSRTDIR --scr SCRDIR --out OUT [--size 512]

All subcommands also take --bit-depth 8|16. Exit status: 0 when every image converted
(Shenzhen images without a mask are skipped, which is not a failure), 1 when at least
one image failed, 2 when the source folder does not look like the expected download.
See data/README.md for the download locations, terms of use and label rules.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

JSRT_SHAPE = (2048, 2048)  # headerless raw, big-endian uint16, 12-bit values
JSRT_MAX = 4095
SCR_STRUCTURES = ("left lung", "right lung", "heart", "left clavicle", "right clavicle")
MANIFEST_FIELDS = ("stem", "group", "width", "height", "labels_present")


class LayoutError(Exception):
    """The source folder does not look like the expected official download."""


class Skip(Exception):
    """The image is left out on purpose (e.g. it has no reference mask)."""


@dataclass
class Sample:
    """One converted case before resizing: image scaled to [0, 1], labels as uint8."""

    image: np.ndarray
    labels: np.ndarray
    structures: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- I/O helpers


def atomic_write(path: Path, write: Callable) -> None:
    """Call write(fileobj) on a temp file in path's folder, then os.replace it onto path.

    The file gets the permissions of any new file, 0o666 less the umask (tempfile.mkstemp's 0o600 would
    keep the outputs from other users whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name for {path.name} in {path.parent}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(array: np.ndarray, path: Path) -> None:
    """Save a 2-D uint8 or uint16 array as a grayscale PNG, atomically."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def write_manifest(rows: list[dict], path: Path) -> None:
    """Write manifest.csv (rows sorted by stem), atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["stem"]))
    atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))


def read_gray(path: Path) -> np.ndarray:
    """Read an 8- or 16-bit grayscale or RGB PNG as float32 scaled to [0, 1].

    8-bit and colour images are divided by 255. 16-bit images often hold 10-14 bit data,
    so they are divided by 2**b - 1, where b is the bit length of the image's maximum
    (at least 8): a 12-bit image keeps its brightness instead of turning nearly black.
    """
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":
                values = np.asarray(im, dtype=np.float64)
                bits = max(8, int(values.max()).bit_length())
                return (values / (2**bits - 1)).astype(np.float32)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def read_binary(path: Path) -> np.ndarray:
    """Read a mask (0/255 or 0/1, any PIL mode) as bool, thresholded at half its maximum."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":
                values = np.asarray(im, dtype=np.float64)
            else:
                values = np.asarray(im.convert("L"), dtype=np.float64)
    except Exception as exc:
        raise ValueError(f"cannot read mask {path}: {exc}") from exc
    return values > values.max() / 2


def read_jsrt_raw(path: Path) -> np.ndarray:
    """Read a JSRT .IMG file and invert it (4095 - v) so bones are bright; float32 in [0, 1]."""
    expected = 2 * JSRT_SHAPE[0] * JSRT_SHAPE[1]
    try:
        size = path.stat().st_size
        if size != expected:
            raise ValueError(f"{size} bytes, expected {expected} "
                             f"(headerless {JSRT_SHAPE[1]}x{JSRT_SHAPE[0]} big-endian uint16)")
        raw = np.fromfile(path, dtype=">u2")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    raw = np.minimum(raw.reshape(JSRT_SHAPE), JSRT_MAX).astype(np.float32)
    return (JSRT_MAX - raw) / JSRT_MAX


def resize_image(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resize a float image to size x size with area averaging (PIL BOX); None keeps it."""
    if size is None or image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize((size, size), Image.BOX))


def resize_mask(mask: np.ndarray, size: int | None) -> np.ndarray:
    """Resize a label or binary mask to size x size with nearest neighbour; None keeps it."""
    if size is None or mask.shape == (size, size):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(resized).astype(mask.dtype)


def quantize(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """Scale a [0, 1] float image to uint8 or uint16."""
    top = 2**bit_depth - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(image, 0.0, 1.0) * top).astype(dtype)


def index_by_stem(files: Iterable[Path], stem_of: Callable[[Path], str]) -> dict[str, list[Path]]:
    """Group files by stem, keeping every path so that duplicates can be reported."""
    index: dict[str, list[Path]] = {}
    for path in sorted(files):
        index.setdefault(stem_of(path), []).append(path)
    return index


def one_file(index: dict[str, list[Path]], stem: str, what: str) -> Path:
    """The single file for stem, or a ValueError naming what is missing or ambiguous."""
    paths = index.get(stem, [])
    if not paths:
        raise ValueError(f"missing {what}")
    if len(paths) > 1:
        raise ValueError(f"ambiguous {what}: " + ", ".join(str(p) for p in paths))
    return paths[0]


def files_with_suffix(folder: Path, suffixes: tuple[str, ...], recursive: bool = False):
    """Files in folder whose suffix (case-insensitive) is one of suffixes."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return [p for p in candidates if p.is_file() and p.suffix.lower() in suffixes]


def labels_present(labels: np.ndarray) -> str:
    return " ".join(str(v) for v in np.unique(labels))


# --------------------------------------------------------------------------- driver


def convert(
    name: str,
    stems: list[str],
    load: Callable[[str], Sample],
    group_of: Callable[[str], str],
    out: Path,
    size: int | None,
    bit_depth: int,
) -> int:
    """Convert every stem with load(), save it, write the manifest; return the exit status."""
    rows, skipped, failed = [], 0, 0
    for stem in tqdm(stems, desc=name, unit="img"):
        try:
            group = group_of(stem)
            sample = load(stem)
            image = quantize(resize_image(sample.image, size), bit_depth)
            labels = resize_mask(sample.labels, size).astype(np.uint8)
            structures = {k: resize_mask(v, size).astype(np.uint8)
                          for k, v in sample.structures.items()}
            if image.shape != labels.shape:
                raise ValueError(f"image size {image.shape} differs from mask size {labels.shape}")
            save_png(image, out / "images" / f"{stem}.png")
            save_png(labels, out / "masks" / f"{stem}.png")
            for key, mask in structures.items():
                save_png(mask, out / "structures" / key / f"{stem}.png")
        except Skip as exc:
            skipped += 1
            tqdm.write(f"skipped {stem}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # report and go on with the next image
            failed += 1
            tqdm.write(f"FAILED {stem}: {exc}", file=sys.stderr)
            continue
        height, width = image.shape
        rows.append(dict(stem=stem, group=group, width=width, height=height,
                         labels_present=labels_present(labels)))
    write_manifest(rows, out / "manifest.csv")
    print(f"{name}: converted {len(rows)}, skipped {skipped}, failed {failed} -> {out}")
    return 1 if failed else 0


def tb_group(stem: str) -> str:
    """Montgomery/Shenzhen group from the name: _0 normal, _1 tuberculosis."""
    groups = {"0": "normal", "1": "tuberculosis"}
    suffix = stem.rsplit("_", 1)[-1]
    if suffix not in groups:
        raise ValueError(f"cannot tell the group from {stem!r} (expected a _0 or _1 ending)")
    return groups[suffix]


def jsrt_group(stem: str) -> str:
    """JSRT group from the name: JPCLN nodule, JPCNN non-nodule."""
    if stem.upper().startswith("JPCLN"):
        return "nodule"
    if stem.upper().startswith("JPCNN"):
        return "non-nodule"
    raise ValueError(f"cannot tell the group from {stem!r} (expected JPCLN* or JPCNN*)")


def require_dir(folder: Path, expected: str) -> None:
    """Raise LayoutError naming folder and what was expected if it is not a folder."""
    if not folder.is_dir():
        raise LayoutError(f"{folder} not found: expected {expected}")


def lung_labels(image: np.ndarray, masks: list[Path]) -> np.ndarray:
    """Union of the lung masks as a 0/1 label map the same size as the image."""
    union = np.zeros(image.shape, dtype=bool)
    for path in masks:
        mask = read_binary(path)
        if mask.shape != image.shape:
            raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"image is {image.shape[1]}x{image.shape[0]}")
        union |= mask
    return union.astype(np.uint8)


# --------------------------------------------------------------------------- datasets


def run_montgomery(args) -> int:
    """NLM MontgomerySet: CXR_png/ plus ManualMask/{leftMask,rightMask}/, merged into label 1."""
    src = args.src
    what = "the NLM MontgomerySet folder with CXR_png/ and ManualMask/{leftMask,rightMask}/"
    for sub in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
        require_dir(src / sub, f"--src {src} to be {what}")
    images = index_by_stem(files_with_suffix(src / "CXR_png", (".png",)), lambda p: p.stem)
    if not images:
        raise LayoutError(f"no .png images in {src / 'CXR_png'}; expected {what}")
    sides = {side: index_by_stem(files_with_suffix(src / "ManualMask" / side, (".png",)),
                                 lambda p: p.stem) for side in ("leftMask", "rightMask")}

    def load(stem: str) -> Sample:
        image = read_gray(one_file(images, stem, "image"))
        masks = [one_file(index, stem, f"mask {src / 'ManualMask' / side / stem}.png")
                 for side, index in sides.items()]
        return Sample(image, lung_labels(image, masks))

    return convert("montgomery", sorted(images), load, tb_group, args.out, args.size,
                   args.bit_depth)


def run_shenzhen(args) -> int:
    """NLM ChinaSet_AllFiles CXR_png/ with Kaggle shcxr-lung-mask <stem>_mask.png masks."""
    src, mask_dir = args.src, args.masks
    require_dir(src / "CXR_png", f"--src {src} to be the NLM ChinaSet_AllFiles folder "
                "with CXR_png/")
    require_dir(mask_dir, "--masks to be the Kaggle shcxr-lung-mask folder with "
                "<stem>_mask.png files")
    images = index_by_stem(files_with_suffix(src / "CXR_png", (".png",)), lambda p: p.stem)
    if not images:
        raise LayoutError(f"no .png images in {src / 'CXR_png'}; expected the NLM "
                          "ChinaSet_AllFiles folder")
    mask_files = [p for p in files_with_suffix(mask_dir, (".png",), recursive=True)
                  if p.stem.endswith("_mask")]
    if not mask_files:
        raise LayoutError(f"no *_mask.png files under {mask_dir}; expected the Kaggle "
                          "shcxr-lung-mask masks named like CHNCXR_0001_0_mask.png")
    masks = index_by_stem(mask_files, lambda p: p.stem[: -len("_mask")])

    def load(stem: str) -> Sample:
        if stem not in masks:
            raise Skip(f"no {stem}_mask.png under {mask_dir}")
        image = read_gray(one_file(images, stem, "image"))
        return Sample(image, lung_labels(image, [one_file(masks, stem, "mask")]))

    return convert("shenzhen", sorted(images), load, tb_group, args.out, args.size,
                   args.bit_depth)


def scr_structure(folder: Path) -> str | None:
    """The SCR structure a folder holds ('left_lung' and 'left lung' both match), or None."""
    name = folder.name.lower().replace("_", " ").replace("-", " ")
    return name if name in SCR_STRUCTURES else None


def run_jsrt(args) -> int:
    """JSRT raw .IMG images with SCR GIF masks, merged into labels 1 lungs, 2 heart, 3 clavicles."""
    images_dir, scr_dir = args.images, args.scr
    require_dir(images_dir, "--images to be the JSRT folder with JPCLN001.IMG ... JPCNN093.IMG")
    require_dir(scr_dir, "--scr to be the SCR folder with fold*/masks/<structure>/<stem>.gif")
    images = index_by_stem(files_with_suffix(images_dir, (".img",), recursive=True),
                           lambda p: p.stem.upper())
    if not images:
        raise LayoutError(f"no .IMG files under {images_dir}; expected the JSRT download "
                          "with raw images such as JPCLN001.IMG")
    masks: dict[str, dict[str, list[Path]]] = {s: {} for s in SCR_STRUCTURES}
    for path in files_with_suffix(scr_dir, (".gif", ".png"), recursive=True):
        structure = scr_structure(path.parent)
        if structure:
            masks[structure].setdefault(path.name.split(".")[0].upper(), []).append(path)
    missing = [s for s in SCR_STRUCTURES if not masks[s]]
    if missing:
        raise LayoutError(
            f"no mask folders for {', '.join(repr(s) for s in missing)} under {scr_dir}; "
            "expected the SCR masks as .../masks/<structure>/<stem>.gif with structure "
            f"folders {', '.join(repr(s) for s in SCR_STRUCTURES)} (spaces or underscores)")

    def load(stem: str) -> Sample:
        image = read_jsrt_raw(one_file(images, stem, "image"))
        part = {s: read_binary(one_file(masks[s], stem, f"SCR '{s}' mask under {scr_dir}"))
                for s in SCR_STRUCTURES}
        structures = {
            "lungs": part["left lung"] | part["right lung"],
            "heart": part["heart"],
            "clavicles": part["left clavicle"] | part["right clavicle"],
        }
        if len({m.shape for m in structures.values()}) != 1:
            raise ValueError(f"the SCR masks of {stem} differ in size")
        labels = np.zeros(structures["lungs"].shape, dtype=np.uint8)
        for value, key in enumerate(("lungs", "heart", "clavicles"), start=1):
            labels[structures[key]] = value  # later (higher) labels win where they overlap
        return Sample(image, labels, structures)

    return convert("jsrt", sorted(images), load, jsrt_group, args.out, args.size,
                   args.bit_depth)


# --------------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)

    def add(name: str, help_text: str, run, default_size: int | None):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(run=run)
        p.add_argument("--out", type=Path, required=True, help="output folder")
        size_help = ("resize to N x N (square, aspect ratio not kept); "
                     f"default: {default_size or 'keep the native size'}")
        p.add_argument("--size", type=positive_int, default=default_size, metavar="N",
                       help=size_help)
        p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8,
                       help="image PNG bit depth (default 8)")
        return p

    p = add("montgomery", "NLM Montgomery County set", run_montgomery, None)
    p.add_argument("--src", type=Path, required=True, help="the MontgomerySet folder")
    p = add("shenzhen", "NLM Shenzhen set + Kaggle shcxr-lung-mask", run_shenzhen, None)
    p.add_argument("--src", type=Path, required=True, help="the ChinaSet_AllFiles folder")
    p.add_argument("--masks", type=Path, required=True, help="folder with *_mask.png files")
    p = add("jsrt", "JSRT images + SCR masks", run_jsrt, 512)
    p.add_argument("--images", type=Path, required=True, help="folder with JSRT .IMG files")
    p.add_argument("--scr", type=Path, required=True, help="SCR folder (masks found recursively)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
