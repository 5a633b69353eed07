"""The client's input discovery on real folder trees: order, filters, symlinks, list files."""

from __future__ import annotations

import io
import os
from pathlib import Path

from client.discovery import check_arguments, iter_items, true_label


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _paths(args: list[str], stdin: io.StringIO | None = None) -> list[str]:
    return [item.path for item in iter_items(args, stdin=stdin)]


def test_walk_is_recursive_sorted_and_keeps_only_image_names(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for rel in [
        "b/2.png",
        "b/10.PNG",
        "a/x.JPG",
        "a/sub/y.webp",
        "c.jpeg",
        "notes.txt",
        "a/readme.md",
        ".hidden/z.png",
        "a/.z.png",
    ]:
        _touch(root / rel)
    got = _paths([str(root)])
    names = [os.path.relpath(p, root) for p in got]
    # Per folder, entries in name order, folders descended where they sort.
    assert names == ["a/sub/y.webp", "a/x.JPG", "b/10.PNG", "b/2.png", "c.jpeg"]


def test_symlink_loops_and_overlapping_arguments_yield_each_image_once(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _touch(root / "cls" / "1.png")
    _touch(root / "cls" / "deep" / "2.png")
    os.symlink("../..", root / "cls" / "deep" / "loop")  # points back at imgs/
    os.symlink(root / "cls", tmp_path / "alias")  # the same folder under another name
    got = _paths([str(root / "cls" / "deep"), str(root), str(tmp_path / "alias")])
    assert sorted(os.path.basename(p) for p in got) == ["1.png", "2.png"]
    assert len(got) == 2


def test_unusual_entries_are_yielded_for_the_scorer_to_report(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _touch(root / "ok.png")
    os.symlink("missing.png", root / "dangling.png")
    os.mkfifo(root / "pipe.png")
    _touch(root / "folder.jpg" / "inner.png")  # a folder with an image name is walked
    got = [os.path.relpath(p, root) for p in _paths([str(root)])]
    assert got == ["dangling.png", "folder.jpg/inner.png", "ok.png", "pipe.png"]


def test_explicit_files_are_sent_whatever_their_extension(tmp_path: Path) -> None:
    f = _touch(tmp_path / "scan.dat")
    assert _paths([str(f)]) == [str(f)]


def test_list_files_and_stdin(tmp_path: Path) -> None:
    a = _touch(tmp_path / "a.png")
    folder = tmp_path / "more"
    _touch(folder / "b.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{a}\n\n{folder}\n{tmp_path / 'gone.png'}\n")
    items = list(iter_items([f"@{listing}"]))
    assert [i.path for i in items] == [str(a), str(folder / "b.png"), str(tmp_path / "gone.png")]
    assert items[0].error is None
    assert items[2].error is not None and items[2].error[0] == "not_found"
    assert _paths(["@-"], stdin=io.StringIO(f"{a}\n")) == [str(a)]


def test_walk_streams_instead_of_listing_everything_first(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _touch(root / "a" / "1.png")
    (root / "z").mkdir()
    items = iter_items([str(root)])
    assert next(items).path.endswith("1.png")
    # Created after the walk started, in a folder it has not reached yet: still found.
    _touch(root / "z" / "late.png")
    assert [i.path for i in items] == [str(root / "z" / "late.png")]


def test_check_arguments_names_each_missing_input(tmp_path: Path) -> None:
    real = _touch(tmp_path / "a.png")
    problems = check_arguments([str(real), str(tmp_path / "nope"), f"@{tmp_path / 'l.txt'}"])
    assert len(problems) == 2
    assert "nope" in problems[0] and "no such file" in problems[0]
    assert "l.txt" in problems[1] and "list file" in problems[1]
    assert check_arguments([str(real), "@-"]) == []


def test_true_label_is_the_parent_folder_name(tmp_path: Path) -> None:
    assert true_label("fashion/Ankle boot/0001.png") == "Ankle boot"
    assert true_label(str(tmp_path / "Coat" / "x.png")) == "Coat"
