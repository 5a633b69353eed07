"""``GET /metrics``: Prometheus exposition summed over every process of the service."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from service.metrics import CONTENT_TYPE_LATEST, exposition

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics", summary="Prometheus metrics (all workers and the engine)", response_class=Response
)
async def metrics() -> Response:
    # Reading every process's files is disk work: keep it off the event loop.
    body = await asyncio.to_thread(exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
