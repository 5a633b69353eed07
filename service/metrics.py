"""Prometheus metrics with the meaning of Triton's (``nv_inference_*``), aggregated across the
service's processes with prometheus_client's multiprocess mode.

The supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at its run directory before any worker or
the engine starts; every process then writes its samples to files there and ``/metrics`` (any
worker) sums them. The engine process owns the batch metrics, the workers the request metrics:

- request success / failure: one per ``/classify`` request (failure labelled by error code);
- inference count: images run by the model; execution count: model runs (batches), so
  ``inference_count / exec_count`` is the mean batch size; plus the batch-size histogram;
- queue duration (per image: enqueued -> its batch starts), compute duration (per batch),
  request duration (per request, end to end), preprocess duration (per image);
- queue depth (images waiting), preprocess backlog, dropped images (caller gone, deadline,
  queue full), clients gone (499).

Every series carries the model, its version, the provider, the graph (fused or unfused) and the
optimisation level, so dashboards can compare configurations.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

LABELS = ("model", "version", "provider", "graph", "opt_level")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Series names, in one place: /v2's statistics and bench.load read them back by name; the
# alert and HPA rules under deploy/ spell them too (tests/test_deploy_manifests.py checks those).
MODEL_INFO = "seresnet_model_info"
READY = "seresnet_ready"
INFERENCE_COUNT = "seresnet_inference_count"
INFERENCE_EXEC_COUNT = "seresnet_inference_exec_count"
BATCH_SIZE = "seresnet_batch_size"
BATCH_RUNS = "seresnet_batch_runs"
BATCH_COMPUTE_SECONDS = "seresnet_batch_compute_seconds"
QUEUE_DURATION_SECONDS = "seresnet_queue_duration_seconds"
COMPUTE_DURATION_SECONDS = "seresnet_compute_duration_seconds"
QUEUE_DEPTH = "seresnet_queue_depth"
ADMITTED_IMAGES = "seresnet_admitted_images"
DROPPED_IMAGES = "seresnet_dropped_images"
FAILED_BATCHES = "seresnet_failed_batches"
ENGINE_STARTS = "seresnet_engine_starts"
INFERENCE_REQUEST_SUCCESS = "seresnet_inference_request_success"
INFERENCE_REQUEST_FAILURE = "seresnet_inference_request_failure"
INFERENCE_REQUEST_SECONDS = "seresnet_inference_request_seconds"
LAST_INFERENCE_TIMESTAMP_SECONDS = "seresnet_last_inference_timestamp_seconds"
IMAGE_FAILURE = "seresnet_image_failure"
REQUEST_DURATION_SECONDS = "seresnet_request_duration_seconds"
PREPROCESS_DURATION_SECONDS = "seresnet_preprocess_duration_seconds"
PREPROCESS_BACKLOG = "seresnet_preprocess_backlog"
HTTP_REFUSED = "seresnet_http_refused"
CLIENT_GONE = "seresnet_client_gone"
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)

__all__ = ["CONTENT_TYPE_LATEST", "EngineMetrics", "IngressMetrics", "collect", "exposition"]


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Histogram edges 1, 2, 4, ... up to max_batch_size (inclusive)."""
    edges, b = [], 1
    while b < max_batch_size:
        edges.append(float(b))
        b *= 2
    edges.append(float(max_batch_size))
    return tuple(edges)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)
    return registry


def exposition() -> bytes:
    """Every process's samples, summed per series (gauges as their mode says)."""
    return generate_latest(_registry())


def collect() -> list[Metric]:
    """The same samples as :func:`exposition`, as metric families: for code in the service
    that needs the numbers (V2 statistics) without a round trip through the text format."""
    return list(_registry().collect())


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay: totals must not go backwards)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


class _Labelled:
    def __init__(self, labels: dict[str, str]) -> None:
        disable_created_metrics()  # *_created series only add noise to every scrape
        self._labels = [labels[k] for k in LABELS]


class EngineMetrics(_Labelled):
    """Batches, queue and readiness; written by the engine process."""

    def __init__(self, labels: dict[str, str], max_batch_size: int, reason: str) -> None:
        super().__init__(labels)
        lv = self._labels
        info = Gauge(
            MODEL_INFO,
            "The served model and how it is run (value 1)",
            [*LABELS, "reason"],
            registry=None,
            multiprocess_mode="livemax",
        )
        info.labels(*lv, reason).set(1)
        self.ready = Gauge(
            READY,
            "1 once warm-up finished and not draining",
            LABELS,
            registry=None,
            multiprocess_mode="livemax",
        ).labels(*lv)
        self.inference_count = Counter(
            INFERENCE_COUNT,
            "Images run by the model (Triton's inference count)",
            LABELS,
            registry=None,
        ).labels(*lv)
        self.exec_count = Counter(
            INFERENCE_EXEC_COUNT,
            "Model runs, i.e. batches (Triton's execution count); inference/exec = mean batch",
            LABELS,
            registry=None,
        ).labels(*lv)
        self.batch_size = Histogram(
            BATCH_SIZE,
            "Images per model run",
            LABELS,
            buckets=batch_buckets(max_batch_size),
            registry=None,
        ).labels(*lv)
        # Exact sizes (at most max_batch_size series) for Triton's per-batch-size statistics.
        self._runs_by_size = Counter(
            BATCH_RUNS,
            "Model runs by exact batch size",
            [*LABELS, "batch_size"],
            registry=None,
        )
        self._seconds_by_size = Counter(
            BATCH_COMPUTE_SECONDS,
            "Time in ONNX Runtime by exact batch size",
            [*LABELS, "batch_size"],
            registry=None,
        )
        self._by_size: dict[int, tuple[Any, Any]] = {}
        self.queue_duration = Histogram(
            QUEUE_DURATION_SECONDS,
            "Per image: time from queued to its batch start",
            LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=None,
        ).labels(*lv)
        self.compute_duration = Histogram(
            COMPUTE_DURATION_SECONDS,
            "Per model run: time in ONNX Runtime",
            LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=None,
        ).labels(*lv)
        self.queue_depth = Gauge(
            QUEUE_DEPTH,
            "Images waiting for a model run",
            LABELS,
            registry=None,
            multiprocess_mode="livesum",
        ).labels(*lv)
        self.admitted = Gauge(
            ADMITTED_IMAGES,
            "Images holding a slot: being decoded by a worker, queued or running",
            LABELS,
            registry=None,
            multiprocess_mode="livesum",
        ).labels(*lv)
        self._dropped = Counter(
            DROPPED_IMAGES,
            "Images admitted but never run, by reason",
            [*LABELS, "reason"],
            registry=None,
        )
        self._failed_batches = Counter(
            FAILED_BATCHES, "Model runs that raised", LABELS, registry=None
        ).labels(*lv)
        self.restarts = Counter(
            ENGINE_STARTS, "Engine processes started", LABELS, registry=None
        ).labels(*lv)

    # BatchObserver ------------------------------------------------------------------

    def on_batch(
        self, size: int, queue_waits: Sequence[float], compute_s: float, failed: bool
    ) -> None:
        self.compute_duration.observe(compute_s)
        for wait in queue_waits:
            self.queue_duration.observe(wait)
        if failed:
            self._failed_batches.inc()
            return
        self.exec_count.inc()
        self.inference_count.inc(size)
        self.batch_size.observe(size)
        runs, seconds = self._by_size.get(size) or self._size_series(size)
        runs.inc()
        seconds.inc(compute_s)

    def _size_series(self, size: int) -> tuple[Any, Any]:
        # Looked up once per size: labels() validates and locks on every call.
        series = (
            self._runs_by_size.labels(*self._labels, str(size)),
            self._seconds_by_size.labels(*self._labels, str(size)),
        )
        self._by_size[size] = series
        return series

    def on_dropped(self, reason: str, images: int) -> None:
        self._dropped.labels(*self._labels, reason).inc(images)

    def on_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)


class IngressMetrics(_Labelled):
    """Requests, per-image errors and preprocessing; written by every ingress worker."""

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__(labels)
        lv = self._labels
        self.request_success = Counter(
            INFERENCE_REQUEST_SUCCESS,
            "Requests answered 200 by /classify or /v2 .../infer",
            LABELS,
            registry=None,
        ).labels(*lv)
        self._request_failure = Counter(
            INFERENCE_REQUEST_FAILURE,
            "Requests to /classify or /v2 .../infer that failed, by code",
            [*LABELS, "code"],
            registry=None,
        )
        # Triton's statistics sum the time of successful and failed requests apart; the
        # duration histogram below mixes both, so the sums are kept by outcome as well.
        self._request_seconds = Counter(
            INFERENCE_REQUEST_SECONDS,
            "Time spent answering inference requests, by outcome (success, failure)",
            [*LABELS, "outcome"],
            registry=None,
        )
        self._success_seconds = self._request_seconds.labels(*lv, "success")
        self._failure_seconds = self._request_seconds.labels(*lv, "failure")
        self.last_success = Gauge(
            LAST_INFERENCE_TIMESTAMP_SECONDS,
            "Unix time of the last successful inference request (all workers: the latest)",
            LABELS,
            registry=None,
            multiprocess_mode="max",
        ).labels(*lv)
        self._image_failure = Counter(
            IMAGE_FAILURE,
            "Images answered with a per-image error, by code",
            [*LABELS, "code"],
            registry=None,
        )
        self.request_duration = Histogram(
            REQUEST_DURATION_SECONDS,
            "Per inference request (/classify, /v2 infer): arrival to response",
            LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=None,
        ).labels(*lv)
        self.preprocess_duration = Histogram(
            PREPROCESS_DURATION_SECONDS,
            "Per image: header, decode and preprocess",
            LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=None,
        ).labels(*lv)
        self.preprocess_backlog = Gauge(
            PREPROCESS_BACKLOG,
            "Images admitted and being decoded, all workers",
            LABELS,
            registry=None,
            multiprocess_mode="livesum",
        ).labels(*lv)

    def request_finished(self, seconds: float, ok: bool) -> None:
        """Every inference request ends here once, whatever its outcome."""
        self.request_duration.observe(seconds)
        (self._success_seconds if ok else self._failure_seconds).inc(seconds)
        if ok:
            self.last_success.set(time.time())

    def request_failure(self, code: str) -> None:
        self._request_failure.labels(*self._labels, code).inc()

    def image_failure(self, code: str) -> None:
        self._image_failure.labels(*self._labels, code).inc()


class HttpMetrics:
    """What the HTTP layer refuses before a route runs (any path), by reason. One per process
    (:func:`http_metrics`): two objects of the same series would overwrite each other's
    samples in multiprocess mode."""

    def __init__(self) -> None:
        disable_created_metrics()
        self._refused = Counter(
            HTTP_REFUSED,
            "Connections or requests refused by the HTTP limits",
            ["reason"],
            registry=None,
        )
        self._gone = Counter(
            CLIENT_GONE,
            "Requests whose client disconnected before the answer (499)",
            ["path"],
            registry=None,
        )

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def client_gone(self, path: str) -> None:
        self._gone.labels(path).inc()


@functools.cache
def http_metrics() -> HttpMetrics:
    return HttpMetrics()
