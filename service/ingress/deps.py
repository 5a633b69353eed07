"""FastAPI dependencies shared by the routers. They are ``async``: FastAPI runs a plain
``def`` dependency in a thread pool, which cost a third of a worker's CPU per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.ingress.dataplane import DataPlane
from service.ingress.errors import ApiError
from service.ingress.state import IngressState


async def get_state(request: Request) -> IngressState:
    return request.app.state.ingress


async def get_plane(request: Request) -> DataPlane:
    return request.app.state.plane


State = Annotated[IngressState, Depends(get_state)]
Plane = Annotated[DataPlane, Depends(get_plane)]


def model_or_404(state: IngressState, name: str, version: str | None = None) -> None:
    card = state.card
    if card is None or name != card.name:
        served = card.name if card else "none loaded yet"
        raise ApiError(404, "model_not_found", f"no model {name!r} (served: {served})")
    if version is not None and version != card.version:
        raise ApiError(
            404,
            "model_version_not_found",
            f"model {name!r} has no version {version!r} (served: {card.version})",
        )
