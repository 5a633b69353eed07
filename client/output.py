"""Result rows: the JSON Lines and CSV writers, and reading an earlier output back for --resume.

A row is a dict, the same in memory as in JSON Lines::

    {"path": "imgs/Coat/0001.png", "true_label": "Coat",
     "predictions": [{"label": "Coat", "class_id": 4, "score": 0.93}, ...]}
    {"path": "imgs/Coat/0002.png", "true_label": "Coat",
     "error": {"code": "decode_error", "message": "...", "scope": "image"}}

``true_label`` is present only with --labels-from-dirs. An error's ``scope`` says whether it is
final: ``image`` is a verdict on the image itself (the service could not decode it, the file is
empty); ``request`` (the request failed even after retries) and ``file`` (the client could not
read the file or list the folder) are retried by the next --resume run, which first drops those
rows, so the file never holds two rows for one image.

Writers flush after every batch of rows: a run that is interrupted, even killed, keeps every
row it wrote. A kill can cut the last line short; reading back drops such a tail.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

Row = dict[str, Any]

#: Error scopes that a --resume run scores again.
RETRIED_SCOPES = frozenset({"request", "file"})


class OutputError(ValueError):
    """The output file cannot be used as asked (format mismatch, corrupt line, ...)."""


def is_final(row: Row) -> bool:
    """Whether a --resume run keeps this row (scored, or an error that would recur)."""
    error = row.get("error")
    return error is None or error.get("scope") not in RETRIED_SCOPES


def _one_line(text: str) -> str:
    # CSV rows must stay one physical line each, so a cut-short tail is detectable.
    return " ".join(str(text).split())


def csv_header(top_k: int, sharded: bool = False) -> list[str]:
    cols = ["path", "true_label", "status"]
    for i in range(1, top_k + 1):
        cols += [f"top{i}_label", f"top{i}_class_id", f"top{i}_score"]
    return [*cols, "error_code", "error_message", "error_scope", *(["shard"] if sharded else [])]


def row_to_csv(row: Row, top_k: int) -> list[str]:
    preds = row.get("predictions") or []
    status = "error" if "error" in row else "ok"
    cells = [row["path"], row.get("true_label") or "", status]
    for i in range(top_k):
        if i < len(preds):
            p = preds[i]
            cells += [p["label"], str(p["class_id"]), repr(float(p["score"]))]
        else:
            cells += ["", "", ""]
    error = row.get("error") or {}
    return [
        *cells,
        error.get("code", ""),
        _one_line(error.get("message", "")),
        error.get("scope", ""),
        *([row["shard"]] if "shard" in row else []),
    ]


def row_from_csv(cells: dict[str, str], top_k: int) -> Row:
    row: Row = {"path": cells["path"]}
    if cells.get("true_label"):
        row["true_label"] = cells["true_label"]
    if cells.get("shard"):
        row["shard"] = cells["shard"]
    if cells.get("status") == "error":
        row["error"] = {
            "code": cells.get("error_code", ""),
            "message": cells.get("error_message", ""),
            "scope": cells.get("error_scope", ""),
        }
        return row
    preds = []
    for i in range(1, top_k + 1):
        label = cells.get(f"top{i}_label", "")
        if label == "" and not cells.get(f"top{i}_class_id"):
            break
        preds.append(
            {
                "label": label,
                "class_id": int(cells[f"top{i}_class_id"]),
                "score": float(cells[f"top{i}_score"]),
            }
        )
    row["predictions"] = preds
    return row


class Writer(Protocol):
    def write(self, rows: list[Row]) -> None: ...
    def close(self) -> None: ...


class _StreamWriter:
    def __init__(self, stream: IO[str], owned: bool) -> None:
        self._stream = stream
        self._owned = owned

    def _flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._flush()
        if self._owned:
            os.fsync(self._stream.fileno())
            self._stream.close()


class JsonlWriter(_StreamWriter):
    def write(self, rows: list[Row]) -> None:
        # One write call per batch: fewer syscalls, and a kill cuts at most the last line.
        self._stream.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._flush()


class CsvWriter(_StreamWriter):
    def __init__(
        self, stream: IO[str], owned: bool, top_k: int, header: bool, sharded: bool = False
    ) -> None:
        super().__init__(stream, owned)
        self._top_k = top_k
        if header:
            self._write_lines([csv_header(top_k, sharded)])

    def _write_lines(self, lines: list[list[str]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(lines)
        self._stream.write(buf.getvalue())
        self._flush()

    def write(self, rows: list[Row]) -> None:
        self._write_lines([row_to_csv(r, self._top_k) for r in rows])


class _OnFirstRows:
    """Opens the real writer when the first rows come: a run that writes nothing (the service
    was unreachable, refused the key) leaves no empty file behind, and an existing one as it
    was."""

    def __init__(self, opener: Callable[[], Writer]) -> None:
        self._opener = opener
        self._writer: Writer | None = None

    def write(self, rows: list[Row]) -> None:
        if not rows:
            return
        if self._writer is None:
            self._writer = self._opener()
        self._writer.write(rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def open_writer(path: str, fmt: str, top_k: int, append: bool, sharded: bool = False) -> Writer:
    """A writer for ``path`` (``-``: standard output), opened with the first rows written;
    ``append`` continues an existing file; ``sharded`` rows carry their shard (a CSV column)."""
    return _OnFirstRows(lambda: _open_now(path, fmt, top_k, append, sharded))


def _open_now(path: str, fmt: str, top_k: int, append: bool, sharded: bool) -> Writer:
    if path == "-":
        stream, owned, fresh = sys.stdout, False, True
    else:
        fresh = not append or not os.path.exists(path) or os.path.getsize(path) == 0
        stream = open(path, "w" if fresh else "a", encoding="utf-8", newline="")  # noqa: SIM115
        owned = True
    if fmt == "csv":
        return CsvWriter(stream, owned, top_k, header=fresh, sharded=sharded)
    return JsonlWriter(stream, owned)


def _lines(path: str) -> Iterator[tuple[int, str, bool, int]]:
    """``(line number, text, complete, end offset)`` of each line; ``complete`` is False only
    for a last line that lacks its newline (a write cut short)."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            offset += len(raw)
            complete = raw.endswith(b"\n")
            yield number, raw.decode("utf-8", errors="replace").rstrip("\r\n"), complete, offset


@dataclass
class Existing:
    """What --resume found in the output file."""

    done: set[str]
    kept: int = 0
    dropped_retry: int = 0
    dropped_tail: bool = False


def _sniff(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head:
        return None
    return "jsonl" if head.startswith(b"{") else "csv"


def _check_shard(path: str, row: Row, shard: object) -> None:
    found = row.get("shard")
    expected = None if shard is None else str(shard)
    if found != expected:
        by = f"--shard {found}" if found else "a run without --shard"
        fix = f"add --shard {found}" if found else "drop --shard"
        raise OutputError(
            f"{path} holds the results of {by}; {fix} to resume it, or give this shard its "
            "own --out file"
        )


def read_existing(
    path: str,
    fmt: str,
    top_k: int,
    on_row: Callable[[Row], None],
    shard: object = None,
) -> Existing:
    """Read an earlier output for --resume: the set of paths not to score again. Every row
    must come from the same ``shard`` (None: an unsharded run), else :class:`OutputError`.

    Final rows (see :func:`is_final`) go to ``on_row`` and into the set. Rows to retry and a
    cut-short last line are removed from the file (rewritten through a temporary file and an
    atomic rename), so that the rows appended next never duplicate or follow a broken line.
    """
    existing = Existing(done=set())
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return existing
    found = _sniff(path)
    if found is None:
        return existing
    if found != fmt:
        raise OutputError(f"{path} holds {found.upper()} results; resume it with --format {found}")
    header: list[str] | None = None
    good_end = 0
    for number, text, complete, end in _lines(path):
        if fmt == "csv" and header is None:
            header = next(csv.reader([text]))
            if header not in (csv_header(top_k), csv_header(top_k, sharded=True)):
                k = sum(1 for h in header if h.endswith("_class_id"))
                raise OutputError(
                    f"{path} was written with --top-k {k} (columns differ); resume it with "
                    f"--top-k {k}, or write to a new --out file"
                )
            good_end = end
            continue
        try:
            if fmt == "csv":
                assert header is not None
                row = row_from_csv(dict(zip(header, next(csv.reader([text])), strict=True)), top_k)
            else:
                row = json.loads(text)
                if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                    raise ValueError("not a result row")
        except (ValueError, KeyError, StopIteration) as exc:
            if not complete:
                existing.dropped_tail = True
                break
            raise OutputError(
                f"{path}, line {number}: not a result row ({exc}); the file is not one this "
                "client wrote, or it was edited. Fix or remove that line, or use a new --out"
            ) from exc
        if not complete:
            # Parsed, but its newline never made it: cheaper to score it again than to patch.
            existing.dropped_tail = True
            break
        _check_shard(path, row, shard)
        good_end = end
        if is_final(row):
            existing.done.add(row["path"])
            existing.kept += 1
            on_row(row)
        else:
            existing.dropped_retry += 1
    if existing.dropped_retry:
        _rewrite_final_rows(path, fmt, good_end)
    elif existing.dropped_tail:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return existing


def _rewrite_final_rows(path: str, fmt: str, good_end: int) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".resume-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            header_seen = False
            scope_at = 0
            for _number, text, _complete, end in _lines(path):
                if end > good_end:
                    break
                if fmt == "csv" and not header_seen:
                    header_seen = True
                    scope_at = next(csv.reader([text])).index("error_scope")
                    out.write(text + "\n")
                    continue
                if fmt == "csv":
                    cells = next(csv.reader([text]))
                    scope = cells[scope_at] if len(cells) > scope_at else ""
                    final = scope not in RETRIED_SCOPES
                else:
                    final = is_final(json.loads(text))
                if final:
                    out.write(text + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
