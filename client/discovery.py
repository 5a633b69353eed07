"""Stream the image paths a job covers: files, folders (recursive) and ``@list`` files.

Nothing here holds all paths at once: folders are walked depth-first and only the entries of
the folders on the current branch are in memory (each folder's names are sorted, so a walk is
reproducible and a resumed run meets the images in the same order). Folders reached twice (via
symlinks, loops included, or because two arguments overlap) are walked once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import NamedTuple, TextIO

#: File name extensions a folder walk picks up (lower case): those of the formats the service
#: reads (tests/test_tables.py ties the two). Files named explicitly, on the command line or in
#: a list file, are sent whatever their name.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".tif", ".tiff",
        ".webp",
    }
)  # fmt: skip


class Item(NamedTuple):
    """One unit of work: an image path, or a path that could not even be listed.

    ``error`` is ``(code, message)`` for a folder that could not be listed or a listed path
    that does not exist; such items become error rows without any request.
    """

    path: str
    error: tuple[str, str] | None = None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def os_error_code(exc: OSError) -> str:
    """A short, stable code for why a path could not be used."""
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "permission_denied"
    if isinstance(exc, IsADirectoryError):
        return "not_a_file"
    return "read_error"


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_arguments(args: Iterable[str]) -> list[str]:
    """Problems with the command-line PATH arguments themselves (missing paths, unreadable
    list files), checked before any work starts; an empty list means all are usable."""
    problems = []
    for arg in args:
        if arg == "@-":
            continue
        path = arg[1:] if arg.startswith("@") else arg
        if not path:
            problems.append(f"{arg!r}: empty path")
        elif arg.startswith("@"):
            if not os.path.isfile(path):
                problems.append(f"{path}: list file not found")
            elif not os.access(path, os.R_OK):
                problems.append(f"{path}: list file not readable")
        elif not os.path.lexists(path):
            problems.append(f"{path}: no such file or directory")
    return problems


def _list_paths(stream: TextIO) -> Iterator[str]:
    """Lines of a list file: one path each; blank lines and ``#`` comments are skipped."""
    for line in stream:
        path = line.rstrip("\r\n")
        if path.strip() and not path.lstrip().startswith("#"):
            yield path


def _sorted_entries(folder: str) -> list[tuple[str, bool]]:
    """``(name, is_folder)`` of a folder's visible entries, sorted by name. Symlinks are
    followed; a dangling one counts as a file so that it is reported, not silently dropped."""
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue  # hidden files: editor/OS droppings such as macOS "._x.jpg"
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            entries.append((entry.name, is_dir))
    entries.sort()
    return entries


class Walker:
    """Expands PATH arguments into :class:`Item` s, remembering which folders it has walked."""

    def __init__(self, stdin: TextIO | None = None) -> None:
        self._visited: set[tuple[int, int]] = set()
        self._stdin = stdin if stdin is not None else sys.stdin

    def items(self, args: Iterable[str]) -> Iterator[Item]:
        for arg in args:
            if arg == "@-":
                yield from self._listed(self._stdin)
            elif arg.startswith("@"):
                with open(arg[1:], encoding="utf-8") as stream:
                    yield from self._listed(stream)
            else:
                yield from self._path(arg, explicit=True)

    def _listed(self, stream: TextIO) -> Iterator[Item]:
        for path in _list_paths(stream):
            yield from self._path(path, explicit=True)

    def _path(self, path: str, explicit: bool) -> Iterator[Item]:
        if os.path.isdir(path):
            yield from self._walk(path)
        elif explicit and not os.path.lexists(path):
            yield Item(path, ("not_found", "no such file or directory"))
        else:
            yield Item(path)

    def _enter(self, folder: str) -> list[tuple[str, bool]] | Item | None:
        """The folder's entries; None when it was walked already; an error Item if unlistable."""
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in self._visited:
                return None
            self._visited.add(key)
            return _sorted_entries(folder)
        except OSError as exc:
            return Item(folder, ("unlisted_folder", f"cannot list folder: {_describe(exc)}"))

    def _walk(self, top: str) -> Iterator[Item]:
        # An explicit stack of iterators, not recursion: depth is unbounded on real trees.
        first = self._enter(top)
        if isinstance(first, Item):
            yield first
            return
        if first is None:
            return
        stack: list[tuple[str, Iterator[tuple[str, bool]]]] = [(top, iter(first))]
        while stack:
            folder, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            name, is_dir = entry
            path = os.path.join(folder, name)
            if is_dir:
                sub = self._enter(path)
                if isinstance(sub, Item):
                    yield sub
                elif sub is not None:
                    stack.append((path, iter(sub)))
            elif is_image_name(name):
                yield Item(path)


def iter_items(args: Iterable[str], stdin: TextIO | None = None) -> Iterator[Item]:
    """All items of ``args`` (files, folders, ``@list`` files, ``@-`` for standard input)."""
    return Walker(stdin).items(args)


def true_label(path: str) -> str:
    """The image's parent folder name: its class in the usual ``class/xxx.jpg`` layout."""
    return os.path.basename(os.path.dirname(os.path.abspath(path)))
