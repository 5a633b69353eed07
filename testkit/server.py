"""Start a real ``python -m service`` on 127.0.0.1 for end-to-end tests (and benchmarks).

The service is started with ``--port 0``: the kernel picks a free port and the service logs the
address it really bound (a JSON line with ``"event": "listening"``), so no port can be stolen
between choosing and binding it. Logs go to a file, never to a pipe that could fill and block
the server.

Typical use::

    from testkit.server import running_service

    env = {"SERESNET_MAX_BATCH_SIZE": "8"}
    with running_service(Path("models/fashion-seresnet"), env=env) as svc:
        httpx.post(f"{svc.url}/classify", ...)
        print(svc.log_text())
    # leaving the block sends SIGTERM and waits for a graceful exit
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "models" / "fashion-seresnet"


class ServiceStartError(RuntimeError):
    """The service exited or did not become ready in time; the message carries its log."""


@dataclass
class ServiceProcess:
    """A running service: its base URL, the process, and its combined stdout/stderr log."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    _stopped: bool = field(default=False, repr=False)

    def log_text(self) -> str:
        """Everything the service wrote so far (stdout and stderr interleaved)."""
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        """The log's JSON lines as dicts (non-JSON lines are skipped)."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    records.append(obj)
        return records

    def metrics_text(self, headers: Mapping[str, str] | None = None) -> str:
        """The Prometheus exposition from ``/metrics``."""
        r = httpx.get(f"{self.url}/metrics", headers=dict(headers or {}), timeout=30)
        r.raise_for_status()
        return r.text

    def metric(
        self,
        name: str,
        headers: Mapping[str, str] | None = None,
        **labels: str,
    ) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return metric_value(self.metrics_text(headers), name, **labels)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: queued work is drained), wait, SIGKILL if it hangs; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stopped = True
        return self.proc.returncode


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus exposition whose labels include
    ``labels`` (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a second listener (gRPC) whose port the test must choose; the
    service refuses to start if it is taken by the time it binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def service_command(model_dir: Path | None, args: Sequence[str] = ()) -> list[str]:
    """The command line that starts the service on 127.0.0.1 with an OS-chosen port."""
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0"]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir)]
    return cmd + list(args)


def _listening_url(service: ServiceProcess) -> str | None:
    for record in service.log_records():
        if record.get("event") == "listening" and record.get("url"):
            return str(record["url"])
    return None


def wait_until(service: ServiceProcess, path: str, deadline: float, expect: int = 200) -> None:
    """Poll ``path`` until it answers ``expect``; raise ServiceStartError if the process dies
    or ``deadline`` (a ``time.monotonic()`` value) passes."""
    while True:
        if service.proc.poll() is not None:
            raise ServiceStartError(
                f"service exited with {service.proc.returncode}:\n{service.log_text()}"
            )
        if not service.url:
            service.url = _listening_url(service) or ""
        if service.url:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{service.url}{path}", timeout=5).status_code == expect:
                    return
        if time.monotonic() > deadline:
            raise ServiceStartError(
                f"{path} did not answer {expect} in time:\n{service.log_text()}"
            )
        time.sleep(0.05)


@contextlib.contextmanager
def start_service(
    model_dir: Path | None,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    log_dir: Path | None = None,
    command: Sequence[str] | None = None,
) -> Iterator[ServiceProcess]:
    """Start the process and yield it as soon as it runs (``.url`` not yet known); the caller
    waits with :func:`wait_until`. Stops it on exit. For tests that watch start-up itself.
    ``command`` replaces ``python -m service ...`` by another server that follows the same
    protocol (a JSON log line with ``"event": "listening"`` and ``"url"``; the bench's naive
    baseline does)."""
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="svc-log-")))
        log_path = Path(log_dir) / f"service-{time.monotonic_ns()}.log"
        # gRPC off unless ``env`` turns it on (free_port()): the default 8001 would collide.
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "SERESNET_GRPC_PORT": "0", **(env or {})}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                list(command) if command is not None else service_command(model_dir, args),
                cwd=REPO_ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        service = ServiceProcess(proc=proc, log_path=log_path)
        try:
            yield service
        finally:
            if not service._stopped:
                service.stop()


@contextlib.contextmanager
def running_service(
    model_dir: Path | None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 120.0,
    args: Sequence[str] = (),
    log_dir: Path | None = None,
    command: Sequence[str] | None = None,
) -> Iterator[ServiceProcess]:
    """Start ``python -m service`` for ``model_dir`` (None: the service's default model) with
    extra environment ``env`` and CLI ``args``, wait until ``/v2/health/ready`` answers 200,
    yield the :class:`ServiceProcess`, and shut it down with SIGTERM on exit."""
    with start_service(model_dir, env=env, args=args, log_dir=log_dir, command=command) as service:
        wait_until(service, "/v2/health/ready", time.monotonic() + ready_timeout)
        yield service
