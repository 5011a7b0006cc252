"""Inputs of folder inference: linked files and folders, input lists, and the permissions of the outputs."""

import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_data_converters import make_montgomery, prepare_data
from test_inference import _rows, _weights, _workflow


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def _listed(records) -> list[tuple[str, str]]:
    return [(r["rel"], r["name"]) for r in records]


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- linked files and folders ----------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path) -> Path:
    """An archive outside the input folder: study1/{a,b}.png, study2/deep/c.png, other/y.png."""
    root = tmp_path / "archive"
    for rel in ("study1/a.png", "study1/b.png", "study2/deep/c.png", "other/y.png"):
        _png(root / rel)
    return root


def test_linked_folders_and_files_are_found_under_their_link_names(tmp_path, archive):
    from scripts.inputs import find_inputs

    root = tmp_path / "in"
    _png(root / "own.png")
    (root / "s1").symlink_to(archive / "study1", target_is_directory=True)
    (root / "nested").mkdir()
    (root / "nested" / "s2").symlink_to(archive / "study2", target_is_directory=True)
    (root / "y.png").symlink_to(archive / "other" / "y.png")
    (root / ".hidden").symlink_to(archive / "other", target_is_directory=True)  # hidden: not followed
    records = find_inputs(str(root))
    assert _listed(records) == [("nested/s2/deep/c.png", "nested/s2/deep/c"), ("own.png", "own"),
                                ("s1/a.png", "s1/a"), ("s1/b.png", "s1/b"), ("y.png", "y")]
    # the paths keep the link names (the user's view), absolute
    assert [r["image"] for r in records] == [str(root / r["rel"]) for r in records]

    linked_root = tmp_path / "in_link"  # the input folder itself a link
    linked_root.symlink_to(root, target_is_directory=True)
    assert _listed(find_inputs(str(linked_root))) == _listed(records)
    assert find_inputs(str(linked_root))[0]["image"] == str(linked_root / "nested/s2/deep/c.png")


def test_link_loops_and_repeated_links_list_each_file_once(tmp_path, archive):
    from scripts.inputs import find_inputs

    root = tmp_path / "in"
    _png(root / "a" / "x.png")
    (root / "a" / "up").symlink_to(root, target_is_directory=True)  # a loop through an ancestor
    (root / "a" / "self").symlink_to(root / "a", target_is_directory=True)  # a loop onto itself
    (root / "l1").symlink_to(archive / "study1", target_is_directory=True)
    (root / "l2").symlink_to(archive / "study1", target_is_directory=True)  # a second link to one folder
    (root / "b_link").symlink_to(root / "z" / "sub", target_is_directory=True)  # to a folder inside IN
    _png(root / "z" / "sub" / "w.png")
    (root / "x_again.png").symlink_to(root / "a" / "x.png")  # a file link to a listed file
    records = find_inputs(str(root))
    # l1 before l2; the real z/sub beats the link b_link that comes first in sorted order
    assert [r["rel"] for r in records] == ["a/x.png", "l1/a.png", "l1/b.png", "z/sub/w.png"]

    only_links = tmp_path / "only_links"
    only_links.mkdir()
    for name in ("p.png", "q.png"):
        (only_links / name).symlink_to(archive / "other" / "y.png")
    assert [r["rel"] for r in find_inputs(str(only_links))] == ["p.png"]  # the first of two file links


def test_hard_links_stay_separate_inputs(tmp_path):
    from scripts.inputs import find_inputs

    root = tmp_path / "in"
    _png(root / "a.png")
    os.link(root / "a.png", root / "b.png")  # archives dedupe with hard links: two studies, two rows
    assert [r["rel"] for r in find_inputs(str(root))] == ["a.png", "b.png"]


def test_broken_links_are_skipped_with_a_log_line(tmp_path, caplog):
    from scripts.inputs import find_inputs

    root = tmp_path / "in"
    _png(root / "ok.png")
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "gone_dir").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    (root / "ring.png").symlink_to(root / "ring.png")  # a link to itself
    with caplog.at_level(logging.INFO, logger="cxr_segmentation.inference"):
        records = find_inputs(str(root))
    assert [r["rel"] for r in records] == ["ok.png"]
    broken = [m for m in caplog.messages if "broken link" in m]
    assert len(broken) == 3 and any(str(root / "gone.png") in m and "nowhere.png" in m for m in broken)


def test_output_folder_reached_through_a_link_is_excluded(tmp_path):
    from scripts.inputs import find_inputs

    root, out = tmp_path / "in", tmp_path / "out"
    _png(root / "x.png")
    _png(out / "x_seg.png")
    (root / "results").symlink_to(out, target_is_directory=True)
    assert [r["rel"] for r in find_inputs(str(root), exclude=[str(out)])] == ["x.png"]
    assert [r["rel"] for r in find_inputs(str(root))] == ["results/x_seg.png", "x.png"]
    # OUT == IN: the input folder is still read
    assert [r["rel"] for r in find_inputs(str(root), exclude=[str(root)])] == ["results/x_seg.png", "x.png"]


# ---- input lists -------------------------------------------------------------------------------------


def test_input_list_relative_absolute_comments_duplicates_missing_and_folders(tmp_path, archive):
    from scripts.inputs import find_inputs

    data = tmp_path / "data"
    _png(data / "ward1" / "p1.png")
    _png(data / "ward1" / "p1.dcm.png")
    _png(data / "ward2" / "p2.png")
    _png(data / "ward2" / "p2.jpg")  # same stem as p2.png: names p2_png and p2_jpg, as in a folder
    _png(data / "folder" / "sub" / "f.png")
    (data / "folder" / "notes.txt").write_text("not an image: a listed folder skips it")
    (data / "ward2" / "not_an_image.txt").write_text("listed by name: it stays and fails")
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "files.txt"
    listing.write_text("\n".join([
        "# export of 2024-05-01",
        "../data/ward2/p2.png",
        "",
        f"   {data / 'ward1' / 'p1.png'}   ",  # absolute, with spaces around
        "../data/ward1/../ward1/p1.png",  # the same file again
        "../data/ward2/p2.jpg",
        "../data/ward2/missing.dcm",
        "../data/ward2/not_an_image.txt",
        "../data/folder",
        "  # an indented comment",
    ]) + "\n")
    records = find_inputs("/does/not/matter", input_list=str(listing))
    assert _listed(records) == [
        ("folder/sub/f.png", "folder/sub/f"),
        ("ward1/p1.png", "ward1/p1"),
        ("ward2/missing.dcm", "ward2/missing"),
        ("ward2/not_an_image.txt", "ward2/not_an_image.txt"),
        ("ward2/p2.jpg", "ward2/p2_jpg"),
        ("ward2/p2.png", "ward2/p2_png"),
    ]
    assert records[2]["image"] == str(data / "ward2" / "missing.dcm")

    # one listed file: rel is its name; a list next to the files, relative names
    (data / "ward2" / "one.txt").write_text("p2.png\n")
    assert _listed(find_inputs("", input_list=str(data / "ward2" / "one.txt"))) == [("p2.png", "p2")]

    # a listed folder keeps its own name as the common folder, and links are followed as in a folder walk
    (data / "ward1" / "linked").symlink_to(archive / "study1", target_is_directory=True)
    (lists / "folder.txt").write_text(f"{data / 'ward1'}\n")
    assert [r["rel"] for r in find_inputs("", input_list=str(lists / "folder.txt"))] == [
        "linked/a.png", "linked/b.png", "p1.dcm.png", "p1.png"]


def test_input_list_missing_or_empty_is_a_clear_error(tmp_path):
    from scripts.inputs import find_inputs

    with pytest.raises(FileNotFoundError, match="input list .*nope.txt does not exist"):
        find_inputs("", input_list=str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="names no file"):
        find_inputs("", input_list=str(tmp_path / "empty.txt"))
    assert find_inputs(str(tmp_path), input_list=None) == [] and find_inputs(str(tmp_path), input_list="") == []


def test_inference_from_an_input_list_gives_a_failed_row_for_a_missing_file_and_readable_outputs(tmp_path):
    data = tmp_path / "data"
    _png(data / "a" / "x.png", 40)
    _png(data / "b" / "y.png", 200)
    listing = tmp_path / "files.txt"
    listing.write_text("data/a/x.png\ndata/b/y.png\ndata/b/lost.png\n")
    out = tmp_path / "out"
    with _umask(0o022):
        wf = _workflow(tmp_path, input_list=str(listing), ckpt_path=str(_weights(tmp_path / "w.pt")),
                       spatial_size=[64, 64], batch_size=2)  # input_dir stays at its default
        wf.initialize()
        wf.run()
        wf.finalize()
    rows = _rows(out / "results.csv")
    assert sorted(rows) == ["a/x.png", "b/lost.png", "b/y.png"]
    assert rows["b/lost.png"]["status"] == "failed" and rows["b/lost.png"]["error"] == "no such file"
    assert rows["a/x.png"]["status"] == rows["b/y.png"]["status"] == "ok"
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"a/x_seg.png", "b/y_seg.png", "results.csv"} <= set(outputs) and len(outputs) >= 5  # and overlays
    assert {p: oct(_mode(out / p)) for p in outputs} == dict.fromkeys(outputs, oct(0o644))  # others can read
    assert not list(out.glob("b/lost*"))


# ---- permissions of the outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, mask, expected):
    from scripts.files import atomic_write, save_png

    with _umask(mask):
        atomic_write(tmp_path / "deep" / "a.csv", lambda tmp: Path(tmp).write_text("x\n"))
        save_png(np.zeros((4, 4), np.uint8), str(tmp_path / "b.png"))
        save_png(np.ones((4, 4), np.uint8), str(tmp_path / "b.png"))  # replacing a file
        prepare_data.save_png(np.zeros((4, 4), np.uint8), tmp_path / "c.png")
        prepare_data.write_manifest([{"stem": "s"}], tmp_path / "manifest.csv")
    for name in ("deep/a.csv", "b.png", "c.png", "manifest.csv"):
        assert _mode(tmp_path / name) == expected, name
    assert Image.open(tmp_path / "b.png").getpixel((0, 0)) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.csv", "b.png", "c.png", "deep", "manifest.csv"]


def test_atomic_write_failure_leaves_no_temporary_file(tmp_path):
    from scripts.files import atomic_write

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.csv", fail)
    assert list(tmp_path.iterdir()) == []


def test_prepare_data_outputs_are_readable_by_others(tmp_path):
    src = make_montgomery(tmp_path, ["MCUCXR_0001_0"])
    out = tmp_path / "out"
    with _umask(0o022):
        assert prepare_data.main(["montgomery", "--src", str(src), "--out", str(out)]) == 0
    files = [out / "images" / "MCUCXR_0001_0.png", out / "masks" / "MCUCXR_0001_0.png", out / "manifest.csv"]
    assert [_mode(p) for p in files] == [0o644] * 3
