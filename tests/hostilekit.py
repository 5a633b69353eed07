"""Measuring an attack against a real service: the attack's answer and time, the latency a
bystander sees on the same worker meanwhile, and the peak RSS of every service process."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from imagesamples import encode
from PIL import Image
from serverutil import ServiceProcess


def small_png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "L"), "PNG")


def process_tree(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += process_tree(int(k))
    return out


def reset_peaks(svc: ServiceProcess) -> None:
    """Start every service process's peak RSS (VmHWM) afresh from its current RSS."""
    for pid in process_tree(svc.proc.pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(svc: ServiceProcess) -> dict[int, float]:
    """Peak RSS of each service process since :func:`reset_peaks`, in MiB."""
    peaks = {}
    for pid in process_tree(svc.proc.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = int(line.split()[1]) / 1024
    return peaks


def cpu_seconds(svc: ServiceProcess) -> float:
    """CPU time (user + system) the service's processes have used so far."""
    total = 0
    for pid in process_tree(svc.proc.pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def classify_small(svc: ServiceProcess, client: httpx.Client) -> float:
    t0 = time.monotonic()
    r = client.post(f"{svc.url}/classify", files=[("images", ("ok.png", small_png(), "image/png"))])
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


@dataclass
class Outcome:
    answers: list[httpx.Response]
    seconds: float
    bystander_max_s: float
    peak_rss_mb: dict[int, float] = field(default_factory=dict)

    @property
    def worst_rss_mb(self) -> float:
        return max(self.peak_rss_mb.values())


def attack(
    svc: ServiceProcess,
    send: Callable[[httpx.Client], httpx.Response],
    copies: int = 1,
    settle_s: float = 0.5,
) -> Outcome:
    """Run ``copies`` of ``send`` at once while a bystander classifies a small image in a loop
    (on the same worker: the services here run one); returns what each got and saw."""
    reset_peaks(svc)
    answers: list[httpx.Response] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with httpx.Client(timeout=120) as client:
                answers.append(send(client))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(copies)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    latencies = []
    with httpx.Client(timeout=120) as bystander:
        while any(t.is_alive() for t in threads):
            latencies.append(classify_small(svc, bystander))
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        # Work left behind by the attack (a decode still burning CPU) shows up here.
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            latencies.append(classify_small(svc, bystander))
    for t in threads:
        t.join()
    assert not errors, errors
    return Outcome(answers, elapsed, max(latencies, default=0.0), peak_rss_mb(svc))
