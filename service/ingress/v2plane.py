"""The Open Inference Protocol (KServe V2) on the data plane: what the ``/v2`` routes do
between the protocol codec (:mod:`service.v2`, pure) and the worker's one request pipeline
(:class:`~service.ingress.pipeline.Pipeline`).

``/infer`` takes the same path as ``/classify``: the body is read under the same byte limits,
worker budget and deadline (408), the images are admitted at the engine under the one global
bound (503 + Retry-After, 504), encoded files are decoded by the same code straight into the
shared-memory slots, and the engine batches them with every other request. A UINT8 tensor the
client preprocessed is copied into the slots instead. The engine answers with the logits.

Statistics are Triton's statistics extension computed from the Prometheus counters the
processes already keep (summed across every worker and the engine by
:func:`service.metrics.collect`, the collector behind ``/metrics``, without a round trip
through the text format).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from starlette.requests import Request

from service import VERSION
from service import metrics as M
from service.ingress.bodies import check_declared_length, read_limited
from service.ingress.pipeline import Files, Held, Outcome, Pipeline, Pixels, http_hangup
from service.ingress.state import IngressState
from service.v2 import metadata as v2meta
from service.v2.errors import ImageRejected
from service.v2.request import (
    HEADER_LENGTH,
    InferRequest,
    decode_body,
    parse_header_length,
)
from service.v2.response import EncodedResponse, encode_infer_response
from service.v2.signature import Signature
from service.v2.stats import BatchDurations, Duration, ModelCounters, model_statistics

# The extensions whose routes this server serves (GET /v2 lists them). Not
# "model_repository": of it only the index is served, no load or unload.
EXTENSIONS = (
    v2meta.BINARY_TENSOR_DATA,
    v2meta.CLASSIFICATION,
    v2meta.MODEL_CONFIGURATION,
    v2meta.STATISTICS,
)

SERVER_NAME = "seresnet-serve"

# A repository-index request body is at most {"ready": true}; anything bigger is not one.
MAX_INDEX_BODY = 4096


class V2Plane:
    def __init__(self, state: IngressState, pipeline: Pipeline) -> None:
        self.state = state
        self.pipeline = pipeline
        self._signature: tuple[object, Signature] | None = None

    # ----------------------------------------------------------------- the model

    def signature(self) -> Signature:
        """The served model in the protocol's terms; re-read when the engine (re)connects
        with another card."""
        card = self.pipeline.card
        if self._signature is None or self._signature[0] is not card:
            self._signature = (card, Signature.from_card(card))
        return self._signature[1]

    def check_model(self, name: str, version: str | None) -> Signature:
        signature = self.signature()
        v2meta.check_model(signature, name, version)
        return signature

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """The protocol's model metadata, plus the card and how the model is run."""
        signature = self.check_model(name, version)
        state = self.state
        card, hello, s = self.pipeline.card, state.engine.hello, state.settings
        return {
            **v2meta.model_metadata(signature),
            "ready": state.ready,
            "engine": hello.info if hello is not None else {},
            "processes": state.processes(),
            "batching": {
                "max_batch_size": hello.max_batch_size if hello else None,
                "max_queue_delay_ms": s.max_queue_delay_ms,
                "max_queue_size": hello.max_queue_size if hello else None,
                "batches_across_workers": True,
            },
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_image_pixels": s.max_image_pixels,
                "max_images_per_request": s.max_images_per_request,
                "request_timeout_s": s.request_timeout_s,
                "decode_memory_mb_per_worker": s.decode_memory_mb,
                "inflight_body_bytes_per_worker": s.inflight_body_bytes(),
                "max_header_bytes": s.max_header_bytes,
                "header_timeout_s": s.header_timeout_s,
                "max_connections_per_worker": s.max_connections,
            },
            "card": card.model_dump(mode="json"),
        }

    def check_ready(self, name: str, version: str | None) -> None:
        self.check_model(name, version)
        self.state.check_ready()

    def server_metadata(self) -> dict[str, Any]:
        return v2meta.server_metadata(SERVER_NAME, VERSION, EXTENSIONS)

    def config(self, name: str, version: str | None) -> dict[str, Any]:
        signature = self.check_model(name, version)
        state = self.state
        settings = state.settings
        hello = state.engine.hello
        info = hello.info if hello is not None else {}
        gpu = info.get("provider") == "cuda"
        batching = v2meta.Batching(
            # The most images one request may carry: the engine splits a request over as
            # many model runs of at most engine_max_batch_size as it needs.
            max_batch_size=settings.max_images_per_request,
            max_queue_delay_us=round(settings.max_queue_delay_ms * 1000),
            instance_kind="KIND_GPU" if gpu else "KIND_CPU",
            gpus=(settings.device_id,) if gpu else (),
        )
        config = v2meta.model_config(signature, batching)
        extra = {
            "engine_max_batch_size": hello.max_batch_size if hello else None,
            "max_queue_size": hello.max_queue_size if hello else None,
            "graph": info.get("graph"),
            "provider": info.get("provider"),
        }
        # Triton's model parameters are string-valued.
        config["parameters"] = {
            k: {"string_value": str(v)} for k, v in extra.items() if v is not None
        }
        config["default_model_filename"] = info.get("graph_file") or "model.onnx"
        return config

    def repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        card = self.state.card
        if card is None:
            return []
        ready = self.state.ready
        if ready_only and not ready:
            return []
        reason = "" if ready else (self.state.engine.not_ready_reason or "not ready")
        entry = v2meta.RepositoryEntry(
            card.name, card.version, "READY" if ready else "UNAVAILABLE", reason
        )
        return v2meta.repository_index([entry])

    # ----------------------------------------------------------------- statistics

    async def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        """Triton's statistics: for every model when ``name`` is None (GET /v2/models/stats)."""
        signature = self.signature() if name is None else self.check_model(name, version)
        # Reading every process's metric files is disk work: keep it off the event loop.
        families = await asyncio.to_thread(M.collect)
        counters = counters_from_metrics(families, signature.model_name, signature.model_version)
        return model_statistics(signature, counters)

    # ----------------------------------------------------------------- /infer

    async def infer(
        self, request: Request, name: str, version: str | None, deadline: float
    ) -> EncodedResponse:
        """``/infer``: the body read as ``/classify``'s is, decoded by the codec, run by the
        pipeline (encoded files decoded into the slots, or the client's pixels copied), the
        logits encoded by the codec."""
        pipeline = self.pipeline
        pipeline.check_ready()
        signature = self.check_model(name, version)
        settings = self.state.settings
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH))
        limit = settings.max_body_bytes

        async def whole(chunks: AsyncIterator[bytes]) -> bytes:
            check_declared_length(request.headers, limit)
            return await read_limited(chunks, limit)

        body = await pipeline.read_body(request, deadline, whole)
        try:
            # A compressed body is counted against the budget at its wire size; inflating
            # is bounded by SERESNET_MAX_BODY_BYTES like any body. Parsed in a decode
            # thread, off the event loop, and bounded before parsing (check_structure).
            infer = await asyncio.get_running_loop().run_in_executor(
                self.state.pool,
                decode_body,
                body.value,
                request.headers.get("content-encoding"),
                header_length,
                signature,
                settings.max_images_per_request,
                limit,
            )
        except BaseException:
            body.give()
            raise
        request.state.images = infer.batch_size
        outcome, errors = await self.run(
            infer, deadline, held=body, hangup=http_hangup(request.receive)
        )
        encoded = encode_infer_response(infer, outcome.logits, signature, errors)
        pipeline.answered(outcome)
        return encoded

    async def run(
        self,
        infer: InferRequest,
        deadline: float,
        *,
        held: Held[Any] | None = None,
        hangup: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[Outcome, dict[int, ImageRejected]]:
        """A decoded request through the pipeline, whichever protocol carried it: the
        outcome and the images that failed, by index."""
        if infer.timeout_us:
            # The client's own deadline (Triton's "timeout" parameter; 0 means none, as in
            # Triton) may only shorten the server's.
            deadline = min(deadline, time.monotonic() + infer.timeout_us / 1e6)
        if infer.pixels is not None:
            images: Files | Pixels = Pixels(infer.pixels)
        else:
            assert infer.files is not None
            images = Files(infer.files)
        outcome = await self.pipeline.run(images, deadline, held=held, hangup=hangup)
        errors = {
            i: ImageRejected(err.message, status=err.status)
            for i, err in enumerate(outcome.errors)
            if err is not None
        }
        return outcome, errors


def counters_from_metrics(families: Iterable[Any], model: str, version: str) -> ModelCounters:
    """Triton's counters from the service's Prometheus metrics of ``model``/``version``
    (every provider, graph and optimisation level the engine ran it with).

    Where the two disagree in granularity, the numbers are what the service measures:
    ``queue`` and ``compute_input`` (decode and preprocess of encoded images) count images,
    ``compute_infer`` counts model runs, where Triton counts requests in all three.
    ``batch_stats`` has the model runs and their time in ONNX Runtime per exact batch size.
    """
    sums: dict[str, float] = {}
    by_size: dict[int, BatchDurations] = {}
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != model or labels.get("version") != version:
                continue
            if "batch_size" in labels:
                infer = by_size.setdefault(
                    int(labels["batch_size"]), BatchDurations()
                ).compute_infer
                if sample.name == f"{M.BATCH_RUNS}_total":
                    infer.count += round(sample.value)
                elif sample.name == f"{M.BATCH_COMPUTE_SECONDS}_total":
                    infer.ns += round(sample.value * 1e9)
                continue
            key = sample.name
            if "outcome" in labels:
                key = f"{key}:{labels['outcome']}"
            if key.endswith("_bucket"):
                continue
            if family.type == "gauge":
                sums[key] = max(sums.get(key, 0.0), sample.value)
            else:
                sums[key] = sums.get(key, 0.0) + sample.value

    def count(name: str) -> int:
        return round(sums.get(name, 0.0))

    def duration(prefix: str) -> Duration:
        return Duration(
            count=count(f"{prefix}_count"), ns=round(sums.get(f"{prefix}_sum", 0.0) * 1e9)
        )

    return ModelCounters(
        inference_count=count(f"{M.INFERENCE_COUNT}_total"),
        execution_count=count(f"{M.INFERENCE_EXEC_COUNT}_total"),
        last_inference_ms=round(sums.get(M.LAST_INFERENCE_TIMESTAMP_SECONDS, 0.0) * 1000),
        success=Duration(
            count=count(f"{M.INFERENCE_REQUEST_SUCCESS}_total"),
            ns=round(sums.get(f"{M.INFERENCE_REQUEST_SECONDS}_total:success", 0.0) * 1e9),
        ),
        fail=Duration(
            count=count(f"{M.INFERENCE_REQUEST_FAILURE}_total"),
            ns=round(sums.get(f"{M.INFERENCE_REQUEST_SECONDS}_total:failure", 0.0) * 1e9),
        ),
        queue=duration(M.QUEUE_DURATION_SECONDS),
        compute_input=duration(M.PREPROCESS_DURATION_SECONDS),
        compute_infer=duration(M.COMPUTE_DURATION_SECONDS),
        batches=by_size,
    )
