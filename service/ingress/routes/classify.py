"""``POST /classify``: the top-k classes of one or more images."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from service.ingress.bodies import IMAGE_FIELD
from service.ingress.deps import Plane, State
from service.ingress.errors import ApiError, ClientGoneError
from service.ingress.middleware import CLIENT_GONE
from service.ingress.schemas import ClassifyResponse, error_responses

router = APIRouter(tags=["classification"])

_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_BODY,
    responses=error_responses(400, 401, 408, 413, 415, 422, 503, 504),
    summary="Classify one or more images (multipart parts named 'images', or a raw body)",
)
async def classify(
    request: Request,
    state: State,
    plane: Plane,
    top_k: Annotated[
        int, Query(ge=1, description="predictions per image (clamped to the class count)")
    ] = 5,
) -> Response:
    t0 = time.perf_counter()
    deadline = time.monotonic() + state.settings.request_timeout_s
    metrics = state.metrics
    ok = False
    try:
        answer = await plane.classify(request, top_k, deadline)
        ok = True
    except ApiError as e:
        if state.metrics is not None:
            state.metrics.request_failure(e.code)
        raise
    except ClientGoneError:
        if state.metrics is not None:
            state.metrics.request_failure("client_gone")
        state.http_metrics.client_gone("/classify")
        request.state.client_gone = True
        request.state.error_code = "client_gone"
        return Response(status_code=CLIENT_GONE)
    finally:
        metrics = state.metrics
        if metrics is not None:
            metrics.request_finished(time.perf_counter() - t0, ok)
    assert metrics is not None
    metrics.request_success.inc()
    return JSONResponse(answer)
