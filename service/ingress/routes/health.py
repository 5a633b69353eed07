"""Liveness and readiness (KServe V2 health)."""

from __future__ import annotations

from fastapi import APIRouter

from service.ingress.deps import State
from service.ingress.schemas import Live, Ready, error_responses

router = APIRouter(prefix="/v2/health", tags=["health"])


# HEAD too: some probes (load balancers, uptime checkers) send HEAD.
@router.api_route("/live", methods=["GET", "HEAD"], summary="Liveness: the worker answers")
async def live() -> Live:
    return Live()


@router.api_route(
    "/ready",
    methods=["GET", "HEAD"],
    summary="Readiness: 200 once the engine has warmed every batch shape",
    responses=error_responses(503),
)
async def ready(state: State) -> Ready:
    state.check_ready()
    return Ready()
