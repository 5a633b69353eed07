"""Every ``/v2`` route (KServe V2 / Open Inference Protocol, with Triton's extensions): health,
server and model metadata, readiness, ``/infer``, Triton's model configuration and
statistics, and the repository index, in one router over :class:`V2Plane` (which answers with
the codec's bodies, :mod:`service.v2`). A model route and its ``/versions/{version}`` form
share one handler. Every error body here is the protocol's ``{"error": "<string>"}``
(:func:`service.errors.error_content`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service.ingress.bodies import read_limited
from service.ingress.deps import State
from service.ingress.schemas import (
    AUTH,
    BODY,
    BUSY,
    IMAGE,
    NOT_READY,
    Live,
    ModelIndex,
    ModelIndexEntry,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    error_responses,
)
from service.ingress.v2plane import MAX_INDEX_BODY, V2Plane
from service.v2.errors import SchemaError

router = APIRouter(prefix="/v2")


async def get_v2(request: Request) -> V2Plane:
    return request.app.state.v2plane


V2 = Annotated[V2Plane, Depends(get_v2)]


@dataclass(frozen=True)
class ModelRef:
    """The model a per-model route names: ``version`` is None on the unversioned path."""

    name: str
    version: str | None


async def get_model_ref(request: Request, name: str) -> ModelRef:
    return ModelRef(name, request.path_params.get("version"))


Model = Annotated[ModelRef, Depends(get_model_ref)]

_VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
NOT_FOUND = ("model_not_found",)


def _versioned(
    method: str, path: str, summary: str, **kwargs: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Serve a handler on ``/models/{name}{path}`` and ``/models/{name}/versions/{version}
    {path}``; the handler reads the version from its :class:`ModelRef`."""
    extra = kwargs.pop("openapi_extra", None) or {}

    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(
            f"/models/{{name}}{path}",
            handler,
            methods=[method],
            summary=summary,
            openapi_extra=extra or None,
            **kwargs,
        )
        versioned_extra = {**extra, "parameters": [_VERSION_PARAM]}
        router.add_api_route(
            f"/models/{{name}}/versions/{{version}}{path}",
            handler,
            methods=[method],
            summary=f"{summary}, of one version",
            openapi_extra=versioned_extra,
            **kwargs,
        )
        return handler

    return register


# ----------------------------------------------------------------------------- health


# HEAD too: some probes (load balancers, uptime checkers) send HEAD.
@router.api_route(
    "/health/live", methods=["GET", "HEAD"], tags=["health"], summary="Liveness: the worker answers"
)
async def live() -> Live:
    return Live()


@router.api_route(
    "/health/ready",
    methods=["GET", "HEAD"],
    tags=["health"],
    summary="Readiness: 200 once the engine has warmed every batch shape",
    responses=error_responses(*NOT_READY, v2=True),
)
async def ready(state: State) -> Ready:
    state.check_ready()
    return Ready()


# ----------------------------------------------------------------------------- metadata


@router.get("", tags=["model"], summary="Server metadata (KServe V2)")
async def server_metadata(v2: V2) -> ServerMetadata:
    return ServerMetadata(**v2.server_metadata())


@router.get("/models", tags=["model"], summary="The models served, with their versions")
async def model_index(state: State) -> ModelIndex:
    card = state.card
    entries = [ModelIndexEntry(name=card.name, versions=[card.version])] if card else []
    return ModelIndex(models=entries)


# Before /models/{name}: the first matching route wins.
@router.get(
    "/models/stats",
    tags=["kserve-v2"],
    responses=error_responses(*AUTH, *NOT_READY, v2=True),
    summary="Triton's inference statistics of every model",
)
async def stats_all(v2: V2) -> dict[str, Any]:
    return await v2.statistics(None, None)


@_versioned(
    "GET",
    "",
    "Model metadata (KServe V2) plus the card, the engine and the processes",
    tags=["model"],
    responses=error_responses(*AUTH, *NOT_FOUND, *NOT_READY, v2=True),
)
async def model_metadata(model: Model, v2: V2) -> ModelMetadata:
    return ModelMetadata(**v2.metadata(model.name, model.version))


@_versioned(
    "GET",
    "/ready",
    "Model readiness",
    tags=["model"],
    responses=error_responses(*AUTH, *NOT_FOUND, *NOT_READY, v2=True),
)
async def model_ready(model: Model, v2: V2) -> ModelReady:
    v2.check_ready(model.name, model.version)
    return ModelReady(name=model.name, ready=True)


# ----------------------------------------------------------------------------- infer

_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "description": "inference request (KServe V2)"}
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "JSON header of Inference-Header-Content-Length bytes, then the "
                    "binary tensor data",
                }
            },
        },
    }
}

_INFER_CODES = (
    *AUTH,
    *BODY,
    *NOT_FOUND,
    *IMAGE,
    "schema_error",
    "unknown_tensor",
    "datatype_mismatch",
    "shape_mismatch",
    "binary_data_error",
    "batch_too_large",
    "unsupported",
    "image_rejected",
    "payload_too_large",
    "deadline_exceeded",
)


@_versioned(
    "POST",
    "/infer",
    "Inference (KServe V2): the model's UINT8 tensor or BYTES encoded images; "
    "logits, or top-k with parameters.classification",
    tags=["kserve-v2"],
    openapi_extra=_INFER_BODY,
    response_class=Response,
    responses=error_responses(*_INFER_CODES, *BUSY, v2=True),
)
async def infer(request: Request, model: Model, v2: V2) -> Response:
    deadline = time.monotonic() + v2.state.settings.request_timeout_s
    async with v2.pipeline.accounted():
        encoded = await v2.infer(request, model.name, model.version, deadline)
    return Response(encoded.body, media_type=encoded.content_type, headers=encoded.headers)


# ----------------------------------------------------------------------------- config, stats


@_versioned(
    "GET",
    "/config",
    "Triton's model configuration (max_batch_size, dims, dynamic batching)",
    tags=["kserve-v2"],
    responses=error_responses(*AUTH, *NOT_FOUND, *NOT_READY, v2=True),
)
async def config(model: Model, v2: V2) -> dict[str, Any]:
    return v2.config(model.name, model.version)


@_versioned(
    "GET",
    "/stats",
    "Triton's inference statistics of a model",
    tags=["kserve-v2"],
    responses=error_responses(*AUTH, *NOT_FOUND, *NOT_READY, v2=True),
)
async def stats(model: Model, v2: V2) -> dict[str, Any]:
    return await v2.statistics(model.name, model.version)


# ----------------------------------------------------------------------------- repository


@router.post(
    "/repository/index",
    tags=["kserve-v2"],
    responses=error_responses(*AUTH, "schema_error", "body_too_large", v2=True),
    summary="The model repository: every model version and its state (body: "
    'optional {"ready": true} for the ready ones only)',
)
async def repository_index(request: Request, v2: V2) -> JSONResponse:
    raw = await read_limited(request.stream(), MAX_INDEX_BODY)
    ready_only = False
    if raw.strip():
        try:
            parsed = json.loads(raw)
        except ValueError as e:
            raise SchemaError(f"the body is not valid JSON: {e}") from None
        ready = parsed.get("ready", False) if isinstance(parsed, dict) else None
        if not isinstance(ready, bool):
            raise SchemaError('the body is {"ready": true|false} or empty')
        ready_only = ready
    return JSONResponse(v2.repository_index(ready_only))
