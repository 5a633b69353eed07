"""End to end, the service as processes: a supervisor, ingress workers and one engine process.
Batches form across workers, metrics add up over all of them, a worker that dies is replaced,
an engine that dies turns readiness off, fails its waiting requests with 503 and is restarted,
and SIGTERM drains every process without losing an accepted request."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from modelcard.schema import read_card
from testkit.images import noise_png
from testkit.server import EMBEDDED_MODEL, ServiceProcess, metric_value, running_service
from testkit.waiting import eventually

pytestmark = pytest.mark.e2e

CARD = read_card(EMBEDDED_MODEL)
META = f"/v2/models/{CARD.name}"


def post(url: str, seed: int, count: int = 1) -> httpx.Response:
    files = [
        ("images", (f"{seed}-{i}.png", noise_png(seed + i), "image/png")) for i in range(count)
    ]
    return httpx.post(f"{url}/classify", files=files, timeout=60)


def children(pid: int) -> set[int]:
    """The service's own child processes (multiprocessing's resource tracker left out)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    out = set()
    for child in map(int, text.split()):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            out.add(child)
    return out


def processes(svc: ServiceProcess) -> dict:
    return httpx.get(f"{svc.url}{META}", timeout=30).json()["processes"]


@pytest.fixture(scope="module")
def two_workers() -> Iterator[ServiceProcess]:
    env = {
        "SERESNET_WORKERS": "2",
        "SERESNET_MAX_BATCH_SIZE": "64",
        "SERESNET_MAX_QUEUE_DELAY_MS": "1500",
        "SERESNET_BATCH_WAIT": "always",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        yield svc


def test_two_workers_batch_together_and_count_together(two_workers: ServiceProcess) -> None:
    svc = two_workers
    info = processes(svc)
    assert info["workers"] == 2
    workers = children(svc.proc.pid) - {info["engine_pid"]}
    assert len(workers) == 2, f"expected 2 ingress workers, found {workers}"
    # Rounds of 12 concurrent single-image requests, each round held 1.5 s for a batch, until
    # both workers have taken some (which worker accepts a connection is the kernel's choice).
    n, rounds, seen = 12, 0, set()
    while seen != workers and rounds < 8:
        rounds += 1
        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(lambda i: post(svc.url, 100 * i), range(n)))
        assert all(r.status_code == 200 for r in responses)
        seen = {
            int(r["pid"])
            for r in svc.log_records()
            if r.get("event") == "request" and r.get("path") == "/classify"
        }
    assert seen == workers, "both workers answered requests"
    text = svc.metrics_text()
    assert metric_value(text, "seresnet_inference_count_total") == n * rounds
    assert metric_value(text, "seresnet_inference_request_success_total") == n * rounds
    # One or two model runs per round, not twelve: batches take every worker's images.
    assert metric_value(text, "seresnet_inference_exec_count_total") <= 3 * rounds


def test_a_worker_that_dies_is_replaced(two_workers: ServiceProcess) -> None:
    svc = two_workers
    engine_pid = processes(svc)["engine_pid"]
    before = children(svc.proc.pid) - {engine_pid}
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    eventually(
        lambda: len(children(svc.proc.pid) - {engine_pid, victim}) == 2,
        "a new worker replaces the killed one",
    )
    eventually(
        lambda: httpx.get(f"{svc.url}/v2/health/ready", timeout=5).status_code == 200, "ready again"
    )
    assert all(post(svc.url, i).status_code == 200 for i in range(6))
    assert any(
        r.get("event") == "ingress worker died and was replaced" and r.get("worker_pid") == victim
        for r in svc.log_records()
    )


@pytest.fixture(scope="module")
def held() -> Iterator[ServiceProcess]:
    """Images wait 30 s for a batch that never fills: they are still queued when the engine
    is killed."""
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_MAX_BATCH_SIZE": "64",
        "SERESNET_MAX_QUEUE_DELAY_MS": "30000",
        "SERESNET_BATCH_WAIT": "always",
        "SERESNET_REQUEST_TIMEOUT_S": "60",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        yield svc


def test_an_engine_that_dies_fails_waiting_requests_and_is_restarted(held: ServiceProcess) -> None:
    svc = held
    first = processes(svc)
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(post, svc.url, 7 + i) for i in range(2)]
        eventually(lambda: svc.metric("seresnet_queue_depth") == 2, "2 images queued")
        os.kill(first["engine_pid"], signal.SIGKILL)
        answers = [f.result() for f in waiting]
    for r in answers:
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "engine_unavailable"
        assert int(r.headers["retry-after"]) >= 1
    # Restarted: a new engine process, a new generation, ready again.
    eventually(
        lambda: (
            processes(svc)["engine_generation"] == first["engine_generation"] + 1
            and httpx.get(f"{svc.url}/v2/health/ready", timeout=5).status_code == 200
        ),
        "the engine is restarted and the service is ready again",
        timeout=120,
    )
    after = processes(svc)
    assert after["engine_pid"] != first["engine_pid"]
    events = [r.get("event") for r in svc.log_records()]
    assert "engine process died; restarting it" in events
    assert "engine restarted" in events


def test_a_lone_request_does_not_wait_for_the_batch_delay() -> None:
    """Nothing else admitted is on its way, so the engine runs the image at once: with a
    one-minute delay and a 20 s deadline, waiting would be a 504."""
    env = {
        "SERESNET_WORKERS": "2",
        "SERESNET_MAX_BATCH_SIZE": "64",
        "SERESNET_MAX_QUEUE_DELAY_MS": "60000",
        "SERESNET_REQUEST_TIMEOUT_S": "20",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        for seed in range(3):
            r = post(svc.url, 40 + seed)
            assert r.status_code == 200, r.text
        assert svc.metric("seresnet_inference_exec_count_total") == 3


def test_not_ready_while_the_engine_is_down() -> None:
    env = {"SERESNET_WORKERS": "1"}
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        engine_pid = processes(svc)["engine_pid"]
        os.kill(engine_pid, signal.SIGSTOP)  # hung, then killed: the supervisor sees it die
        os.kill(engine_pid, signal.SIGKILL)
        eventually(
            lambda: httpx.get(f"{svc.url}/v2/health/ready", timeout=5).status_code == 503,
            "not ready once the engine is gone",
            timeout=10,
        )
        eventually(
            lambda: httpx.get(f"{svc.url}/v2/health/ready", timeout=5).status_code == 200,
            "ready again after the restart",
            timeout=120,
        )
        assert post(svc.url, 1).status_code == 200


def test_sigterm_drains_every_worker_and_the_engine() -> None:
    env = {
        "SERESNET_WORKERS": "2",
        "SERESNET_MAX_BATCH_SIZE": "64",
        "SERESNET_MAX_QUEUE_DELAY_MS": "5000",
        "SERESNET_BATCH_WAIT": "always",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        n = 10
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(post, svc.url, 300 + i) for i in range(n)]
            eventually(lambda: svc.metric("seresnet_queue_depth") == n, "all queued")
            code = svc.stop(timeout=60)
            answers = [f.result() for f in futures]
        assert [r.status_code for r in answers] == [200] * n
        assert code == 0
        records = svc.log_records()
        drained = next(r for r in records if r.get("event") == "drained")
        assert drained["images_run"] >= n
        assert [r.get("event") for r in records][-1] == "stopped"
        assert not any(r.get("level") == "error" for r in records), svc.log_text()


def test_slots_come_back_whatever_happens_to_the_images() -> None:
    """Requests whose every image fails, single bad images, and deadlines: none may keep its
    slots, or a small queue bound would soon refuse everything."""
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_MAX_QUEUE_SIZE": "4",
        "SERESNET_MAX_IMAGES_PER_REQUEST": "2",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        bad = [
            ("images", (f"bad{i}.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")) for i in range(2)
        ]
        for _ in range(6):
            r = httpx.post(f"{svc.url}/classify", files=bad, timeout=30)
            assert r.status_code == 200
            assert all("error" in x for x in r.json()["results"])
            r = httpx.post(f"{svc.url}/classify", files=bad[:1], timeout=30)
            assert r.status_code == 415  # a PNG signature, then nothing Pillow can identify
        assert post(svc.url, 1, count=2).status_code == 200
        eventually(lambda: svc.metric("seresnet_admitted_images") == 0, "every slot is free")
