"""Polling for something a real process does in its own time."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def eventually(
    check: Callable[[], bool], what: str, timeout: float = 60, interval: float = 0.05
) -> None:
    """Return once ``check()`` is true; an HTTP error counts as not yet (a server that is
    restarting refuses connections). Raise AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(interval)
