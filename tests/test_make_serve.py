"""`make serve` stopped by Ctrl-C or SIGTERM: the service drains and exits, and make reports no
failure ("make: *** [serve] Terminated" read like one, and a SIGTERM sent to make alone used to
leave the service running)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make"),
]


def _as_from_a_terminal() -> None:
    # A background job may start with SIGINT ignored (a POSIX shell does that to `cmd &`
    # without job control; CI runners can too). Dispositions survive exec and bash cannot trap
    # a signal ignored at entry, so Ctrl-C could never be tested; a terminal never ignores it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@contextlib.contextmanager
def make_serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, str]]:
    """`make serve` on a free port, in its own session (as a terminal would run it); yields
    the process, its output file and the service's URL once it is ready."""
    venv = tmp_path / "venv"  # a stand-in: -o keeps make from setting it up
    out = tmp_path / "make.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            [
                "make",
                "-s",
                "-o",
                f"{venv}/.runtime",
                "serve",
                f"VENV={venv}",
                f"PY={sys.executable}",
                "PORT=0",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_as_from_a_terminal,
        )
    try:
        url = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if not url:
                for line in out.read_text(errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict) and record.get("event") == "listening":
                            url = record["url"]
            if url:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                        break
            time.sleep(0.2)
        else:
            raise AssertionError(f"make serve did not become ready:\n{out.read_text()}")
        yield proc, out, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _service_gone(url: str) -> bool:
    try:
        httpx.get(f"{url}/v2/health/live", timeout=2)
    except httpx.TransportError:
        return True
    return False


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigterm-to-the-group", "sigterm-to-make-alone"],
)
def test_stopping_make_serve_is_not_reported_as_a_failure(
    tmp_path: Path, sig: signal.Signals, group: bool
) -> None:
    with make_serve(tmp_path) as (proc, out, url):
        (os.killpg if group else os.kill)(proc.pid, sig)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "make serve did not stop in 90 s; its output:\n"
                + out.read_text(errors="replace")[-6000:]
            ) from None
        text = out.read_text(errors="replace")
        assert "make: ***" not in text, text
        assert "Traceback" not in text, text
        assert '"drained"' in text  # the service shut down its own way, answering what it had
        assert _service_gone(url)
