"""Result files on disk: incremental writes, CSV round trips, reading back for --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.output import OutputError, Row, open_writer, read_existing

OK: Row = {
    "path": "imgs/Coat/1.png",
    "true_label": "Coat",
    "predictions": [
        {"label": "Coat", "class_id": 4, "score": 0.75},
        {"label": "Shirt", "class_id": 6, "score": 0.125},
    ],
}
BAD_IMAGE: Row = {
    "path": "imgs/Coat/2.png",
    "true_label": "Coat",
    "error": {"code": "decode_error", "message": "cannot\nidentify", "scope": "image"},
}
FAILED_REQUEST: Row = {
    "path": "imgs/Bag/3.png",
    "error": {"code": "connection_error", "message": "Connection refused", "scope": "request"},
}
UNREADABLE: Row = {
    "path": "imgs/Bag/4.png",
    "error": {"code": "not_found", "message": "cannot open", "scope": "file"},
}


def _write(out: Path, fmt: str, *batches: list[Row], append: bool = False) -> None:
    writer = open_writer(str(out), fmt, top_k=2, append=append)
    for rows in batches:
        writer.write(rows)
    writer.close()


def _read_back(path: Path, fmt: str, top_k: int = 2) -> tuple[set[str], list[Row]]:
    rows: list[Row] = []
    existing = read_existing(str(path), fmt, top_k, rows.append)
    return existing.done, rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_rows_are_on_disk_before_close(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"r.{fmt}"
    writer = open_writer(str(out), fmt, top_k=2, append=False)
    writer.write([OK])
    # Another reader sees the row while the writer is still open: a kill loses nothing.
    done, _ = _read_back(out, fmt)
    assert done == {OK["path"]}
    writer.close()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_round_trip_keeps_final_rows_and_drops_retryable_ones(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"r.{fmt}"
    _write(out, fmt, [OK, FAILED_REQUEST], [BAD_IMAGE, UNREADABLE])

    done, rows = _read_back(out, fmt)
    assert done == {OK["path"], BAD_IMAGE["path"]}
    assert rows[0] == OK
    assert rows[1]["error"]["code"] == "decode_error"
    assert rows[1]["error"]["scope"] == "image"
    # The failed rows are gone from the file itself, so a resumed run cannot duplicate them.
    again, _ = _read_back(out, fmt)
    assert again == done
    text = out.read_text()
    assert FAILED_REQUEST["path"] not in text and UNREADABLE["path"] not in text

    _write(
        out, fmt, [{"path": FAILED_REQUEST["path"], "predictions": OK["predictions"]}], append=True
    )
    done, _ = _read_back(out, fmt)
    assert done == {OK["path"], BAD_IMAGE["path"], FAILED_REQUEST["path"]}


def test_jsonl_rows_are_one_json_object_per_line(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    _write(out, "jsonl", [OK, BAD_IMAGE])
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [OK, BAD_IMAGE]


def test_csv_has_a_column_per_rank_and_one_line_per_row(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    _write(out, "csv", [OK, BAD_IMAGE])
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[:6] == [
        "path",
        "true_label",
        "status",
        "top1_label",
        "top1_class_id",
        "top1_score",
    ]
    assert len(lines) == 3  # the message's line break did not split the row
    assert lines[1].startswith("imgs/Coat/1.png,Coat,ok,Coat,4,0.75,Shirt,6,0.125")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"r.{fmt}"
    _write(out, fmt, [OK, BAD_IMAGE])
    whole = out.read_bytes()
    out.write_bytes(whole[:-7])  # the last row lost its end, as under SIGKILL mid-write
    done, _ = _read_back(out, fmt)
    assert done == {OK["path"]}
    assert out.read_bytes().endswith(b"\n")  # truncated back to the last whole row
    _write(out, fmt, [BAD_IMAGE], append=True)
    assert out.read_bytes() == whole


def test_a_corrupt_line_in_the_middle_is_an_error_not_silently_dropped(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps(OK) + "\n" + "garbage\n" + json.dumps(BAD_IMAGE) + "\n")
    with pytest.raises(OutputError, match="line 2"):
        _read_back(out, "jsonl")
    assert "garbage" in out.read_text()  # nothing was lost


def test_format_and_top_k_mismatches_are_explained(tmp_path: Path) -> None:
    out = tmp_path / "r.out"
    _write(out, "csv", [OK])
    with pytest.raises(OutputError, match="--format csv"):
        _read_back(out, "jsonl")
    with pytest.raises(OutputError, match="--top-k 2"):
        _read_back(out, "csv", top_k=5)


def test_missing_or_empty_file_means_nothing_done(tmp_path: Path) -> None:
    assert _read_back(tmp_path / "none.jsonl", "jsonl") == (set(), [])
    (tmp_path / "empty.jsonl").write_text("")
    assert _read_back(tmp_path / "empty.jsonl", "jsonl") == (set(), [])
