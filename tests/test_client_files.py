"""What the client does before any request: reading files, and its retry-timing rules."""

from __future__ import annotations

import email.utils
import os
from pathlib import Path

import pytest

from client.scoring import (
    FileProblem,
    Settings,
    backoff_delay,
    parse_retry_after,
    read_image_file,
)


def test_reads_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "a.png"
    f.write_bytes(b"\x89PNG...")
    assert read_image_file(str(f)) == b"\x89PNG..."


def _problem(path: Path) -> FileProblem:
    with pytest.raises(FileProblem) as info:
        read_image_file(str(path))
    return info.value


def test_what_even_root_cannot_read_is_reported_not_fatal(tmp_path: Path) -> None:
    # chmod 000 does not stop root; these do.
    os.symlink("missing.png", tmp_path / "dangling.png")
    assert _problem(tmp_path / "dangling.png").code == "not_found"
    os.symlink("loop.png", tmp_path / "loop.png")
    assert _problem(tmp_path / "loop.png").code == "read_error"
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading must not hang
    problem = _problem(tmp_path / "pipe.png")
    assert problem.code == "not_a_file" and problem.scope == "file"
    (tmp_path / "dir.png").mkdir()
    assert _problem(tmp_path / "dir.png").code in ("not_a_file", "read_error")


def test_an_empty_file_is_a_verdict_on_the_image(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    problem = _problem(tmp_path / "empty.png")
    assert (problem.code, problem.scope) == ("empty_file", "image")


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(0, usegmt=True), now=10.0) == 0.0


def test_backoff_grows_is_capped_and_yields_to_retry_after() -> None:
    s = Settings(url="http://x", backoff_base=0.5, backoff_max=4.0, retry_after_max=60.0)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        for _ in range(20):
            assert ceiling / 2 <= backoff_delay(attempt, s, None) <= ceiling
    for _ in range(20):
        assert 2.0 <= backoff_delay(5, s, 2.0) <= 2.0 + 0.25
        assert 60.0 <= backoff_delay(0, s, 3600.0) <= 66.05
