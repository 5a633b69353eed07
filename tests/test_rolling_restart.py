"""A rolling restart behind a real balancer loses nothing: three replicas of ``python -m
service`` on 127.0.0.1 behind HAProxy (Debian's package, unpacked, not installed; health checks
on /v2/health/ready, as a Kubernetes Service follows readiness), the real scoring client at
``--retries 0`` scoring a few thousand images through it while each replica is restarted in
turn with SIGTERM: with SERESNET_SHUTDOWN_DELAY_S, no image is lost and none is scored twice.
Then a replica is SIGKILLed mid-job: the client's retries bring the loss back to 0.

Slow (three replicas and a long job on a shared box): it runs with ``make rolling-check``
(SERESNET_ROLLING_CHECK=1), which CI runs after ``make test``. SERESNET_ROLLING_SUMMARY=FILE
writes the table (images, lost, duplicated, per scenario) as JSON; the scenario without the
delay is measured too, for comparison, not asserted."""

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from debtools import library_env, unpacked
from imagesamples import encode
from PIL import Image
from serverutil import EMBEDDED_MODEL, REPO_ROOT, service_command

pytestmark = pytest.mark.skipif(
    os.environ.get("SERESNET_ROLLING_CHECK") != "1",
    reason="slow (three replicas behind HAProxy): run it with `make rolling-check`",
)

N_IMAGES = int(os.environ.get("SERESNET_ROLLING_IMAGES", "6000"))
DELAY_S = 3.0
HAPROXY_PACKAGES = ["haproxy", "liblua5.3-0", "libopentracing-c-wrapper0", "libopentracing1"]
RESULTS: dict[str, dict[str, object]] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    port: int
    env: dict[str, str]
    logs: Path
    proc: subprocess.Popen[bytes] | None = None
    log_files: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.logs / f"replica-{self.port}-{len(self.log_files)}.log"
        self.log_files.append(log)
        cmd = service_command(EMBEDDED_MODEL, ["--port", str(self.port)])
        with open(log, "wb") as out:
            # Its own process group: SIGKILL takes the engine and the workers too.
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log_files[
                -1
            ].read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, "replica not ready in time"
            time.sleep(0.1)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def served_images(self) -> int:
        """Images this replica's instances answered with 200 on /classify (their logs)."""
        total = 0
        for log in self.log_files:
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    r = json.loads(line)
                    if (
                        r.get("event") == "request"
                        and r.get("path") == "/classify"
                        and r.get("status") == 200
                    ):
                        total += int(r.get("images", 0))
        return total


HAPROXY_CONFIG = """\
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # HAProxy's defaults otherwise: retries 3 on a failed connect, to the same server.
frontend scoring
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server check inter 500ms fall 1 rise 2
{servers}
"""


@contextlib.contextmanager
def haproxy(replicas: list[Replica], workdir: Path) -> Iterator[str]:
    root = unpacked(HAPROXY_PACKAGES)
    port = free_port()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{r.port}" for i, r in enumerate(replicas))
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
    binary = root / "usr" / "sbin" / "haproxy"
    check = subprocess.run(
        [str(binary), "-c", "-f", str(config)], env=library_env(root), capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with open(workdir / "haproxy.log", "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "-db", "-f", str(config)],
            env=library_env(root),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.1)
        time.sleep(1.5)  # every server through its `rise`
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def images() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rolling-imgs-") as tmp:
        rng = np.random.default_rng(11)
        for i in range(N_IMAGES):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Path(tmp, f"{i:05d}.png").write_bytes(encode(Image.fromarray(pixels, "L"), "PNG"))
        yield Path(tmp)


def scenario(name: str, images: Path, tmp_path: Path, delay_s: float, kill: bool) -> dict:
    env = {
        "SERESNET_WORKERS": "1",
        # Few batch shapes, one warm-up round, one ORT thread: a replacement is ready in
        # seconds even on a box the client and two other replicas keep busy.
        "SERESNET_MAX_BATCH_SIZE": "8",
        "SERESNET_WARMUP_ROUNDS": "1",
        "SERESNET_INTRA_OP_THREADS": "1",
        "SERESNET_SHUTDOWN_DELAY_S": str(delay_s),
        "SERESNET_DRAIN_TIMEOUT_S": "20",
        # Longer than HAProxy keeps idle connections: the server never closes one under it.
        "SERESNET_KEEPALIVE_TIMEOUT_S": "60",
        "SERESNET_LOG_LEVEL": "info",
    }
    replicas = [Replica(free_port(), env, tmp_path) for _ in range(3)]
    for r in replicas:
        r.start()
    try:
        for r in replicas:
            r.wait_ready()
        with haproxy(replicas, tmp_path) as url:
            out = tmp_path / "out.jsonl"
            retries = "5" if kill else "0"
            client = subprocess.Popen(
                [
                    sys.executable, "-m", "client", "score", str(images), "--url", url,
                    "--out", str(out), "--retries", retries, "--batch-size", "2",
                    "--concurrency", "2", "--quiet",
                ],
                cwd=REPO_ROOT,
                env={k: v for k, v in os.environ.items() if not k.startswith("SERESNET_")},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            restarts = 0
            time.sleep(2)  # the job under way
            for r in replicas:
                if client.poll() is not None:
                    break
                t0 = time.monotonic()
                if kill and restarts == 1:
                    r.kill()
                else:
                    code = r.terminate()
                    assert code == 0, r.log_files[-1].read_text()[-3000:]
                restarts += 1
                t_stop = time.monotonic()
                r.start()
                r.wait_ready()
                print(
                    f"replica {r.port}: stopped in {t_stop - t0:.1f} s, "
                    f"ready again in {time.monotonic() - t_stop:.1f} s"
                )
                time.sleep(1.5)  # HAProxy's `rise 2` at 500 ms: back in the rotation
            _, stderr = client.communicate(timeout=900)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        scored = {row["path"] for row in rows if "predictions" in row}
        served = sum(r.served_images() for r in replicas)
        result = {
            "images": N_IMAGES,
            "scored": len(scored),
            "lost": N_IMAGES - len(scored),
            # A SIGKILLed replica's last log lines die with it: no exact count there.
            "duplicated": None if kill else served - len(scored),
            "restarts": restarts,
            "shutdown_delay_s": delay_s,
            "client_retries": int(retries),
            "replica_killed": kill,
            "client_exit": client.returncode,
        }
        RESULTS[name] = result
        print(f"\n{name}: {result}", flush=True)
        assert restarts == 3, f"the job ended after {restarts} restarts: raise N_IMAGES"
        assert len(rows) == N_IMAGES, (len(rows), stderr[-2000:])
        return result
    finally:
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait(timeout=30)


def test_rolling_restart_without_the_delay_is_measured(images: Path, tmp_path: Path) -> None:
    scenario("sigterm, no shutdown delay", images, tmp_path, delay_s=0, kill=False)


def test_rolling_restart_with_the_delay_loses_nothing(images: Path, tmp_path: Path) -> None:
    result = scenario("sigterm, shutdown delay", images, tmp_path, delay_s=DELAY_S, kill=False)
    assert result["lost"] == 0 and result["client_exit"] == 0, result
    assert result["duplicated"] == 0, result


def test_a_killed_replica_loses_nothing_with_client_retries(images: Path, tmp_path: Path) -> None:
    result = scenario("sigkill, client retries", images, tmp_path, delay_s=DELAY_S, kill=True)
    assert result["lost"] == 0 and result["client_exit"] == 0, result


def teardown_module() -> None:
    target = os.environ.get("SERESNET_ROLLING_SUMMARY")
    if target and RESULTS:
        Path(target).write_text(json.dumps(RESULTS, indent=2) + "\n")
