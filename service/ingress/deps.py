"""FastAPI dependencies shared by the routers. They are ``async``: FastAPI runs a plain
``def`` dependency in a thread pool, which cost a third of a worker's CPU per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.ingress.pipeline import Pipeline
from service.ingress.state import IngressState


async def get_state(request: Request) -> IngressState:
    return request.app.state.ingress


async def get_pipeline(request: Request) -> Pipeline:
    return request.app.state.pipeline


State = Annotated[IngressState, Depends(get_state)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
