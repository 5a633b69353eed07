"""The Open Inference Protocol (KServe V2) on the data plane: what the ``/v2`` routes do
between the protocol codec (:mod:`service.v2`, pure) and the engine (:class:`DataPlane`).

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
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import numpy as np
from starlette.requests import Request

from service import metrics as service_metrics
from service.ingress.bodies import check_declared_length, read_limited
from service.ingress.dataplane import DataPlane
from service.ingress.engine_client import EngineCallError
from service.ingress.errors import ApiError, v2_error_code
from service.ingress.state import IngressState
from service.v2 import metadata as v2meta
from service.v2.errors import ImageRejected, V2Error
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

# A repository-index request body is at most {"ready": true}; anything bigger is not one.
MAX_INDEX_BODY = 4096


class V2Plane:
    def __init__(self, state: IngressState, plane: DataPlane) -> None:
        self.state = state
        self.plane = plane
        self._signature: tuple[object, Signature] | None = None

    # ----------------------------------------------------------------- the model

    def signature(self) -> Signature:
        """The served model in the protocol's terms; re-read when the engine (re)connects
        with another card."""
        card = self.state.card
        if card is None:
            raise V2Error(
                "no model is loaded yet (the engine is starting)",
                status=503,
                headers={"Retry-After": "1"},
            )
        if self._signature is None or self._signature[0] is not card:
            self._signature = (card, Signature.from_card(card))
        return self._signature[1]

    def check_model(self, name: str, version: str | None) -> Signature:
        signature = self.signature()
        v2meta.check_model(signature, name, version)
        return signature

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
        families = await asyncio.to_thread(service_metrics.collect)
        counters = counters_from_metrics(families, signature.model_name, signature.model_version)
        return model_statistics(signature, counters)

    # ----------------------------------------------------------------- /infer

    async def infer(
        self, request: Request, name: str, version: str | None, deadline: float
    ) -> EncodedResponse:
        state = self.state
        state.check_ready()
        signature = self.check_model(name, version)
        settings = state.settings
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH))
        body, held = await self._read_body(request, deadline)

        def body_done() -> None:
            # The body's bytes leave the worker's in-flight budget once they are in the
            # slots, as /classify's do; exactly once, whichever way the request ends.
            nonlocal held
            state.body_budget.give(held)
            held = 0

        try:
            # A compressed body is counted against the budget at its wire size; inflating
            # is bounded by SERESNET_MAX_BODY_BYTES like any body.
            # Parsed in a decode thread, off the event loop (bounded: see check_structure).
            infer = await asyncio.get_running_loop().run_in_executor(
                state.pool,
                decode_body,
                body,
                request.headers.get("content-encoding"),
                header_length,
                signature,
                settings.max_images_per_request,
                settings.max_body_bytes,
            )
            request.state.images = infer.batch_size
            if infer.timeout_us:
                # The client's own deadline (Triton's "timeout" parameter; 0 means none, as
                # in Triton) may only shorten the server's.
                deadline = min(deadline, time.monotonic() + infer.timeout_us / 1e6)
            logits, errors = await self._run(request, infer, signature, deadline, body_done)
        finally:
            body_done()
        return encode_infer_response(infer, logits, signature, errors)

    async def _run(
        self,
        request: Request,
        infer: InferRequest,
        signature: Signature,
        deadline: float,
        body_done: Callable[[], None],
    ) -> tuple[np.ndarray, dict[int, ImageRejected]]:
        """Admit, fill the slots, run; the logits of every image (rows of failed images are
        zeros) and the images that failed, by index. ``body_done`` is called once the body's
        bytes are no longer needed."""
        plane = self.plane
        n = infer.batch_size
        metrics = self.state.metrics
        errors: dict[int, ImageRejected] = {}
        try:
            lease = await plane.admit(n, deadline)
            finished = False
            try:
                if infer.pixels is not None:
                    # On the event loop, synchronously: a copy of at most
                    # SERESNET_MAX_BODY_BYTES, and no thread can still be writing into the
                    # slots if the lease is given back.
                    for i in range(n):
                        lease.slot(i)[...] = infer.pixels[i]
                else:
                    assert infer.files is not None
                    failures = await plane.decode_into(infer.files, lease, deadline)
                    for i, err in enumerate(failures):
                        if err is not None:
                            errors[i] = ImageRejected(err.message, status=err.status)
                            if metrics is not None:
                                metrics.image_failure(err.code)
                body_done()
                good = [i for i in range(n) if i not in errors]
                logits = np.zeros((n, signature.num_classes), dtype=np.float32)
                if good:
                    logits[good] = await plane.run(
                        lease, good, deadline, ("logits",), request.receive
                    )
                else:
                    lease.release()  # nothing to run: every image failed to decode
                finished = True
            finally:
                if not finished:
                    lease.release()
        except EngineCallError as e:
            raise ApiError(e.status, e.code, e.message, e.headers) from None
        return logits, errors

    async def _read_body(self, request: Request, deadline: float) -> tuple[bytes, int]:
        """The raw body under SERESNET_MAX_BODY_BYTES, the worker's in-flight byte budget and
        the deadline, as ``/classify``'s is read; with the bytes it holds against the budget
        (give them back with ``state.body_budget.give``)."""
        limit = self.state.settings.max_body_bytes

        async def whole(chunks: AsyncIterator[bytes]) -> bytes:
            check_declared_length(request.headers, limit)
            return await read_limited(chunks, limit)

        return await self.plane.read_limited_body(request, deadline, whole)


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
                if sample.name == "seresnet_batch_runs_total":
                    infer.count += round(sample.value)
                elif sample.name == "seresnet_batch_compute_seconds_total":
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
        inference_count=count("seresnet_inference_count_total"),
        execution_count=count("seresnet_inference_exec_count_total"),
        last_inference_ms=round(sums.get("seresnet_last_inference_timestamp_seconds", 0.0) * 1000),
        success=Duration(
            count=count("seresnet_inference_request_success_total"),
            ns=round(sums.get("seresnet_inference_request_seconds_total:success", 0.0) * 1e9),
        ),
        fail=Duration(
            count=count("seresnet_inference_request_failure_total"),
            ns=round(sums.get("seresnet_inference_request_seconds_total:failure", 0.0) * 1e9),
        ),
        queue=duration("seresnet_queue_duration_seconds"),
        compute_input=duration("seresnet_preprocess_duration_seconds"),
        compute_infer=duration("seresnet_compute_duration_seconds"),
        batches=by_size,
    )


def failure_code(exc: BaseException) -> str:
    """The code a failed request is counted under in the metrics."""
    if isinstance(exc, ApiError):
        return exc.code
    if isinstance(exc, V2Error):
        return v2_error_code(exc)
    return "internal_error"
