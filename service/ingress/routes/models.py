"""Server and model metadata (KServe V2), with the card and how the model is run.

Under ``/v2`` every error body is the protocol's ``{"error": "<string>"}``
(:mod:`service.ingress.errors`)."""

from __future__ import annotations

from fastapi import APIRouter

from service import VERSION
from service.ingress.deps import State, model_or_404
from service.ingress.schemas import (
    ModelIndex,
    ModelIndexEntry,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    error_responses,
)
from service.ingress.state import IngressState
from service.v2 import metadata as v2meta
from service.v2.signature import Signature

router = APIRouter(prefix="/v2", tags=["model"])


@router.get("", summary="Server metadata (KServe V2)")
async def server_metadata(state: State) -> ServerMetadata:
    return ServerMetadata(name="seresnet-serve", version=VERSION, extensions=list(state.extensions))


@router.get("/models", summary="The models served, with their versions")
async def model_index(state: State) -> ModelIndex:
    card = state.card
    entries = [ModelIndexEntry(name=card.name, versions=[card.version])] if card else []
    return ModelIndex(models=entries)


@router.get(
    "/models/{name}",
    responses=error_responses(401, 404),
    summary="Model metadata (KServe V2) plus the card, the engine and the processes",
)
async def model_metadata(name: str, state: State) -> ModelMetadata:
    return _metadata(state, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    responses=error_responses(401, 404),
    summary="Metadata of one version of the model (as for the model)",
)
async def model_version_metadata(name: str, version: str, state: State) -> ModelMetadata:
    return _metadata(state, name, version)


def _metadata(state: IngressState, name: str, version: str | None) -> ModelMetadata:
    model_or_404(state, name, version)
    card = state.card
    hello = state.engine.hello
    assert card is not None and hello is not None
    signature = Signature.from_card(card)
    s = state.settings
    return ModelMetadata(
        name=card.name,
        versions=[card.version],
        platform="onnxruntime_onnx",
        inputs=v2meta.model_inputs(signature),
        outputs=[{"name": card.output.logits, "datatype": "FP32", "shape": [-1, card.num_classes]}],
        ready=state.ready,
        engine=hello.info,
        processes=state.processes(),
        batching={
            "max_batch_size": hello.max_batch_size,
            "max_queue_delay_ms": s.max_queue_delay_ms,
            "max_queue_size": hello.max_queue_size,
            "batches_across_workers": True,
        },
        limits={
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
        card=card.model_dump(mode="json"),
    )


@router.get(
    "/models/{name}/ready", responses=error_responses(401, 404, 503), summary="Model readiness"
)
async def model_ready(name: str, state: State) -> ModelReady:
    model_or_404(state, name)
    state.check_ready()
    return ModelReady(name=name, ready=True)


@router.get(
    "/models/{name}/versions/{version}/ready",
    responses=error_responses(401, 404, 503),
    summary="Readiness of one version",
)
async def model_version_ready(name: str, version: str, state: State) -> ModelReady:
    model_or_404(state, name, version)
    state.check_ready()
    return ModelReady(name=name, ready=True)
