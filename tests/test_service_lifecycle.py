"""End to end, the service's life beyond single requests, each against a real
``python -m service`` on 127.0.0.1: batching under concurrency (proved by the metrics), queue
bound (503 + Retry-After), deadlines (504), callers that hang up, readiness only after warm-up,
the API key, the op-library fallback, and a graceful shutdown that loses no accepted request.

Long queue delays make the timing-dependent cases deterministic: images are held in the queue
for seconds, far longer than any of the steps the tests take meanwhile."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from modelcard.schema import read_card
from testkit.images import noise_png
from testkit.server import (
    EMBEDDED_MODEL,
    ServiceProcess,
    running_service,
    start_service,
    wait_until,
)
from testkit.waiting import eventually

pytestmark = pytest.mark.e2e

CARD = read_card(EMBEDDED_MODEL)


def post_png(
    url: str, seed: int, headers: dict[str, str] | None = None, count: int = 1
) -> httpx.Response:
    files = [
        ("images", (f"{seed}-{i}.png", noise_png(seed + i), "image/png")) for i in range(count)
    ]
    return httpx.post(f"{url}/classify", files=files, headers=headers or {}, timeout=120)


# ----------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def held() -> Iterator[ServiceProcess]:
    """Batches never fill (64) and wait 30 s: every image stays queued until its deadline."""
    env = {
        "SERESNET_MAX_BATCH_SIZE": "64",
        "SERESNET_MAX_QUEUE_DELAY_MS": "30000",
        "SERESNET_BATCH_WAIT": "always",  # a lone request waits too
        "SERESNET_MAX_QUEUE_SIZE": "3",
        "SERESNET_MAX_IMAGES_PER_REQUEST": "3",
        "SERESNET_REQUEST_TIMEOUT_S": "6",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        yield svc


def test_full_queue_is_503_with_retry_after_and_a_deadline_is_504(held: ServiceProcess) -> None:
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_png, held.url, 0, None, 3)
        eventually(lambda: held.metric("seresnet_queue_depth") == 3, "3 images queued")
        refused = post_png(held.url, 10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        timed_out = first.result()
    assert timed_out.status_code == 504
    assert timed_out.json()["error"]["code"] == "deadline_exceeded"
    assert held.metric("seresnet_dropped_images_total", reason="deadline") == 3
    assert held.metric("seresnet_dropped_images_total", reason="queue_full") == 1
    assert held.metric("seresnet_queue_depth") == 0
    assert held.metric("seresnet_inference_count_total") == 0  # nothing was run for nobody
    assert held.metric("seresnet_inference_request_failure_total", code="queue_full") == 1
    assert held.metric("seresnet_inference_request_failure_total", code="deadline_exceeded") == 1


def test_a_caller_that_hangs_up_costs_no_model_run(held: ServiceProcess) -> None:
    before = held.metric("seresnet_dropped_images_total", reason="cancelled")
    body = noise_png(7)
    parts = urlsplit(held.url)
    request = (
        f"POST /classify HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        eventually(lambda: held.metric("seresnet_queue_depth") == 1, "the image is queued")
    # the socket is closed: the service notices and withdraws the image
    eventually(
        lambda: held.metric("seresnet_dropped_images_total", reason="cancelled") == before + 1,
        "the queued image is dropped",
    )
    assert held.metric("seresnet_queue_depth") == 0
    assert held.metric("seresnet_inference_count_total") == 0
    assert held.metric("seresnet_inference_exec_count_total") == 0


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def batching() -> Iterator[ServiceProcess]:
    env = {
        "SERESNET_MAX_BATCH_SIZE": "64",
        "SERESNET_MAX_QUEUE_DELAY_MS": "1500",
        "SERESNET_BATCH_WAIT": "always",  # hold requests, to drain them
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        yield svc


def test_concurrent_requests_are_batched(batching: ServiceProcess) -> None:
    n = 16
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda i: post_png(batching.url, 100 + i), range(n)))
    assert all(r.status_code == 200 for r in responses)
    images = batching.metric("seresnet_inference_count_total")
    runs = batching.metric("seresnet_inference_exec_count_total")
    assert images == n
    assert runs < n / 2  # mean batch size = inference count / execution count > 2
    assert batching.metric("seresnet_batch_size_bucket", le="1.0") < runs  # not all singles
    assert batching.metric("seresnet_batch_size_sum") == n


def test_graceful_shutdown_loses_no_accepted_request(batching: ServiceProcess) -> None:
    n = 8
    depth_before = batching.metric("seresnet_queue_depth")
    assert depth_before == 0
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(post_png, batching.url, 200 + i) for i in range(n)]
        eventually(lambda: batching.metric("seresnet_queue_depth") == n, "all queued")
        code = batching.stop(timeout=60)  # SIGTERM while 8 accepted requests wait
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * n
    assert all(len(r.json()["results"][0]["predictions"]) == 5 for r in responses)
    assert code in (0, -signal.SIGTERM)
    events = [r.get("event") for r in batching.log_records()]
    assert events.index("draining") < events.index("drained")
    drained = next(r for r in batching.log_records() if r.get("event") == "drained")
    assert drained["images_run"] == 16 + n


# ----------------------------------------------------------------------------- start-up


@dataclass
class Started:
    svc: ServiceProcess
    early_ready: httpx.Response
    early_classify: httpx.Response
    key: str


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """API key set, a long warm-up (to watch readiness), and an op library that cannot load."""
    bogus = tmp_path_factory.mktemp("ops") / "libseresnet_ops.so"
    bogus.write_bytes(b"not a shared object")
    key = "s3cret-key"
    env = {
        "SERESNET_API_KEY": key,
        "SERESNET_WARMUP_ROUNDS": "300",
        "SERESNET_OPS_LIBRARY": str(bogus),
    }
    with start_service(EMBEDDED_MODEL, env=env) as svc:
        wait_until(svc, "/v2/health/live", time.monotonic() + 120)
        auth = {"Authorization": f"Bearer {key}"}
        early_ready = httpx.get(f"{svc.url}/v2/health/ready", timeout=30)
        early_classify = post_png(svc.url, 1, auth)
        wait_until(svc, "/v2/health/ready", time.monotonic() + 300)
        yield Started(svc, early_ready, early_classify, key)


def test_not_ready_until_warmed_up(configured: Started) -> None:
    for r in (configured.early_ready, configured.early_classify):
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
    # /v2 errors are the KServe V2 protocol's {"error": "<string>"}, which Triton's clients parse.
    assert "warming up" in configured.early_ready.json()["error"]
    assert configured.early_classify.json()["error"]["code"] == "not_ready"
    assert "warming up" in configured.early_classify.json()["error"]["message"]
    events = [r.get("event") for r in configured.svc.log_records()]
    assert events.index("listening") < events.index("warm-up complete") < events.index("ready")
    auth = {"Authorization": f"Bearer {configured.key}"}
    assert post_png(configured.svc.url, 2, auth).status_code == 200


def test_api_key(configured: Started) -> None:
    url = configured.svc.url
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": configured.key},
        {"Authorization": f"Basic {configured.key}"},
    ):
        r = post_png(url, 3, headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/v2/models/{CARD.name}").status_code == 401
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    auth = {"Authorization": f"Bearer {configured.key}"}
    assert post_png(url, 3, auth).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=auth).status_code == 200


def test_an_op_library_that_cannot_load_means_the_unfused_graph(configured: Started) -> None:
    auth = {"Authorization": f"Bearer {configured.key}"}
    engine = httpx.get(f"{configured.svc.url}/v2/models/{CARD.name}", headers=auth).json()["engine"]
    assert engine["graph"] == "unfused" and engine["graph_file"] == "model.onnx"
    assert "op library unavailable" in engine["reason"]
    assert engine["ops"]["loaded"] is False and "libseresnet_ops.so" in engine["ops"]["error"]
    warnings = [
        r for r in configured.svc.log_records() if r.get("event") == "serving the unfused graph"
    ]
    assert warnings and "op library unavailable" in warnings[0]["reason"]
    text = configured.svc.metrics_text(auth)
    assert 'graph="unfused"' in text
