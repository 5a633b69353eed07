"""The Open Inference Protocol (KServe V2) routes Triton's clients use beyond health and
metadata: ``/infer`` (JSON and binary tensor data, classification extension), Triton's model
configuration and statistics, and the repository index. Errors are ``{"error": "<string>"}``
(:mod:`service.ingress.errors` shapes every answer under ``/v2``)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from service.ingress.bodies import read_limited
from service.ingress.deps import State
from service.ingress.v2plane import MAX_INDEX_BODY, V2Plane
from service.v2.errors import SchemaError

router = APIRouter(prefix="/v2", tags=["kserve-v2"])


async def get_v2(request: Request) -> V2Plane:
    return request.app.state.v2plane


V2 = Annotated[V2Plane, Depends(get_v2)]


class V2ErrorBody(BaseModel):
    error: str = Field(examples=["unknown model 'resnet'; this server serves 'fashion-seresnet'"])


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "the request does not fit the protocol or the model (says which)",
        401: "missing or wrong API key",
        404: "no such model or version",
        408: "the request body did not arrive in time",
        413: "body, image or decoded image over the limits",
        415: "an encoded image of an unsupported format (the only image sent)",
        503: "queue full, engine restarting or not ready (Retry-After)",
        504: "deadline exceeded",
    }
    return {s: {"model": V2ErrorBody, "description": text[s]} for s in statuses}


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


# ----------------------------------------------------------------------------- infer


async def _infer(
    request: Request, state: State, v2: V2Plane, name: str, version: str | None
) -> Response:
    deadline = time.monotonic() + state.settings.request_timeout_s
    async with v2.pipeline.accounted():
        encoded = await v2.infer(request, name, version, deadline)
    return Response(encoded.body, media_type=encoded.content_type, headers=encoded.headers)


_INFER_SUMMARY = (
    "Inference (KServe V2): the model's UINT8 tensor or BYTES encoded images; "
    "logits, or top-k with parameters.classification"
)


@router.post(
    "/models/{name}/infer",
    openapi_extra=_INFER_BODY,
    response_class=Response,
    responses=_errors(400, 401, 404, 408, 413, 415, 503, 504),
    summary=_INFER_SUMMARY,
)
async def infer(name: str, request: Request, state: State, v2: V2) -> Response:
    return await _infer(request, state, v2, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    openapi_extra=_INFER_BODY,
    response_class=Response,
    responses=_errors(400, 401, 404, 408, 413, 415, 503, 504),
    summary=_INFER_SUMMARY,
)
async def infer_version(
    name: str, version: str, request: Request, state: State, v2: V2
) -> Response:
    return await _infer(request, state, v2, name, version)


# ----------------------------------------------------------------------------- config


@router.get(
    "/models/{name}/config",
    responses=_errors(401, 404),
    summary="Triton's model configuration (max_batch_size, dims, dynamic batching)",
)
async def config(name: str, v2: V2) -> dict[str, Any]:
    return v2.config(name, None)


@router.get(
    "/models/{name}/versions/{version}/config",
    responses=_errors(401, 404),
    summary="Triton's model configuration of one version",
)
async def config_version(name: str, version: str, v2: V2) -> dict[str, Any]:
    return v2.config(name, version)


# ----------------------------------------------------------------------------- statistics
# /v2/models/stats must be matched before /v2/models/{name}: this router is included first.


@router.get(
    "/models/stats", responses=_errors(401), summary="Triton's inference statistics of every model"
)
async def stats_all(v2: V2) -> dict[str, Any]:
    return await v2.statistics(None, None)


@router.get(
    "/models/{name}/stats",
    responses=_errors(401, 404),
    summary="Triton's inference statistics of a model",
)
async def stats(name: str, v2: V2) -> dict[str, Any]:
    return await v2.statistics(name, None)


@router.get(
    "/models/{name}/versions/{version}/stats",
    responses=_errors(401, 404),
    summary="Triton's inference statistics of one version",
)
async def stats_version(name: str, version: str, v2: V2) -> dict[str, Any]:
    return await v2.statistics(name, version)


# ----------------------------------------------------------------------------- repository


@router.post(
    "/repository/index",
    responses=_errors(400, 401),
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
