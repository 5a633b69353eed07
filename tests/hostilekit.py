"""Measuring an attack against a real service: the attack's answer and time, the latency a
bystander sees on the same worker meanwhile, and the peak RSS of every service process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from testkit.images import noise_png
from testkit.processes import peak_rss_mb, reset_peaks
from testkit.server import ServiceProcess


def classify_small(svc: ServiceProcess, client: httpx.Client) -> float:
    t0 = time.monotonic()
    r = client.post(
        f"{svc.url}/classify", files=[("images", ("ok.png", noise_png(0), "image/png"))]
    )
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
    reset_peaks(svc.proc.pid)
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
    return Outcome(answers, elapsed, max(latencies, default=0.0), peak_rss_mb(svc.proc.pid))
