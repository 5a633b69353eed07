"""Prometheus metrics with the meaning of Triton's (``nv_inference_*``).

- request success / failure: one per ``/classify`` request (failure labelled by error code);
- inference count: images run by the model; execution count: model runs (batches), so
  ``inference_count / exec_count`` is the mean batch size; plus the batch-size histogram;
- queue duration (per image: enqueued -> its batch starts), compute duration (per batch),
  request duration (per request, end to end);
- queue depth (images waiting), dropped images (caller gone, deadline, queue full).

Every series carries the model, its version, the provider, the graph (fused or unfused) and
the optimisation level, so dashboards can compare configurations. Each app has its own
registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LABELS = ("model", "version", "provider", "graph", "opt_level")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                    5.0, 10.0, 30.0)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Histogram edges 1, 2, 4, ... up to max_batch_size (inclusive)."""
    edges, b = [], 1
    while b < max_batch_size:
        edges.append(float(b))
        b *= 2
    edges.append(float(max_batch_size))
    return tuple(edges)


class Metrics:
    """The service's metrics; ``labels`` fixes the LABELS values for this app's model."""

    def __init__(self, labels: dict[str, str], max_batch_size: int, reason: str) -> None:
        disable_created_metrics()  # *_created series only add noise to every scrape
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = [labels[k] for k in LABELS]
        r = self.registry
        info = Gauge("seresnet_model_info", "The served model and how it is run (value 1)",
                     [*LABELS, "reason"], registry=r)
        info.labels(*self._labels, reason).set(1)
        self.ready = Gauge("seresnet_ready", "1 once warm-up finished and not draining",
                           LABELS, registry=r).labels(*self._labels)
        self.request_success = Counter(
            "seresnet_inference_request_success", "Requests answered 200 by /classify",
            LABELS, registry=r).labels(*self._labels)
        self._request_failure = Counter(
            "seresnet_inference_request_failure", "Requests to /classify that failed, by code",
            [*LABELS, "code"], registry=r)
        self._image_failure = Counter(
            "seresnet_image_failure", "Images answered with a per-image error, by code",
            [*LABELS, "code"], registry=r)
        self.inference_count = Counter(
            "seresnet_inference_count", "Images run by the model (Triton's inference count)",
            LABELS, registry=r).labels(*self._labels)
        self.exec_count = Counter(
            "seresnet_inference_exec_count",
            "Model runs, i.e. batches (Triton's execution count); inference/exec = mean batch",
            LABELS, registry=r).labels(*self._labels)
        self.batch_size = Histogram(
            "seresnet_batch_size", "Images per model run", LABELS,
            buckets=batch_buckets(max_batch_size), registry=r).labels(*self._labels)
        self.queue_duration = Histogram(
            "seresnet_queue_duration_seconds", "Per image: time from queued to its batch start",
            LABELS, buckets=_LATENCY_BUCKETS, registry=r).labels(*self._labels)
        self.compute_duration = Histogram(
            "seresnet_compute_duration_seconds", "Per model run: time in ONNX Runtime",
            LABELS, buckets=_LATENCY_BUCKETS, registry=r).labels(*self._labels)
        self.request_duration = Histogram(
            "seresnet_request_duration_seconds", "Per /classify request: arrival to response",
            LABELS, buckets=_LATENCY_BUCKETS, registry=r).labels(*self._labels)
        self.preprocess_duration = Histogram(
            "seresnet_preprocess_duration_seconds", "Per image: decode and preprocess",
            LABELS, buckets=_LATENCY_BUCKETS, registry=r).labels(*self._labels)
        self.queue_depth = Gauge("seresnet_queue_depth", "Images waiting for a model run",
                                 LABELS, registry=r).labels(*self._labels)
        self.preprocess_backlog = Gauge(
            "seresnet_preprocess_backlog", "Images admitted and not yet queued (decoding)",
            LABELS, registry=r).labels(*self._labels)
        self._dropped = Counter(
            "seresnet_dropped_images", "Queued images never run, by reason",
            [*LABELS, "reason"], registry=r)
        self._failed_batches = Counter(
            "seresnet_failed_batches", "Model runs that raised", LABELS,
            registry=r).labels(*self._labels)

    def request_failure(self, code: str) -> None:
        self._request_failure.labels(*self._labels, code).inc()

    def image_failure(self, code: str) -> None:
        self._image_failure.labels(*self._labels, code).inc()

    # BatchObserver ------------------------------------------------------------------

    def on_batch(self, size: int, queue_waits: Sequence[float], compute_s: float,
                 failed: bool) -> None:
        self.compute_duration.observe(compute_s)
        for wait in queue_waits:
            self.queue_duration.observe(wait)
        if failed:
            self._failed_batches.inc()
            return
        self.exec_count.inc()
        self.inference_count.inc(size)
        self.batch_size.observe(size)

    def on_dropped(self, reason: str, images: int) -> None:
        self._dropped.labels(*self._labels, reason).inc(images)

    def on_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
