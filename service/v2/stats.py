"""Triton's statistics extension (``GET /v2/models/{name}[/versions/{v}]/stats``) from plain
counters, which whoever runs the model keeps.

Triton's meanings: ``success``/``fail`` count requests and sum their end-to-end time;
``queue``, ``compute_input``, ``compute_infer`` and ``compute_output`` count successful
requests and sum the time each spent in that phase; ``inference_count`` counts images,
``execution_count`` model runs; ``batch_stats`` has one entry per batch size that ran, each
counting runs of that size. Times are nanoseconds, ``last_inference`` milliseconds since the
epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.v2.signature import Signature


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelCounters:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)


def model_statistics(signature: Signature, counters: ModelCounters) -> dict[str, Any]:
    """The statistics response for the one served model version."""
    c = counters
    # Triton has a response cache; this server has none, so its counters stay zero.
    no_cache = Duration()
    stat = {
        "name": signature.model_name,
        "version": signature.model_version,
        "last_inference": c.last_inference_ms,
        "inference_count": c.inference_count,
        "execution_count": c.execution_count,
        "inference_stats": {
            "success": c.success.as_json(),
            "fail": c.fail.as_json(),
            "queue": c.queue.as_json(),
            "compute_input": c.compute_input.as_json(),
            "compute_infer": c.compute_infer.as_json(),
            "compute_output": c.compute_output.as_json(),
            "cache_hit": no_cache.as_json(),
            "cache_miss": no_cache.as_json(),
        },
        "response_stats": {},
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": b.compute_input.as_json(),
                "compute_infer": b.compute_infer.as_json(),
                "compute_output": b.compute_output.as_json(),
            }
            for size, b in sorted(c.batches.items())
        ],
        "memory_usage": [],
    }
    return {"model_stats": [stat]}
