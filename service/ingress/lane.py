"""The hot route's fast lane: ``POST /classify`` served from the middleware stack, past
Starlette's exception middleware and router and FastAPI's request handler.

That machinery (exception middleware, the exit stack, path matching, dependency solving,
the endpoint wrapper) cost a single-image request about a sixth of a worker's CPU
(bench.peers, paired runs: c=64 1,310-1,430 -> 1,530-1,585 req/s, CPU 1.25 -> 1.08 ms a
request; c=1 p50 2.16 -> 1.96 ms). The lane sits inside the request-id/access-log and API-key
middleware, so both still apply; it calls the route's own endpoint with the arguments FastAPI
would solve (the worker's pipeline; ``top_k`` validated by the route's own declaration) and
answers a failure with the app's own exception handlers, so every answer is the route's.
What has no handler goes up to the request-id middleware, as it does from the router. Any
other method or path goes on to FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.ingress.routes import classify

PATH = "/classify"
_TOP_K = TypeAdapter(classify.TopK)


def top_k(request: Request) -> int:
    """``?top_k=`` as the route declares it; RequestValidationError as FastAPI raises it."""
    raw = request.query_params.get("top_k")
    if raw is None:
        return classify.DEFAULT_TOP_K
    try:
        return _TOP_K.validate_python(raw)
    except ValidationError as e:
        errors = [{**err, "loc": ("query", "top_k")} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors) from None


class ClassifyLane:
    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response: Any = await classify.classify(
                request, self.owner.state.pipeline, top_k(request)
            )
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Any:
        """The app's handler for ``exc``, found as Starlette's exception middleware finds it
        (the catch-all ``Exception`` handler is not its: that error goes up)."""
        handlers = self.owner.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in handlers:
                return handlers[cls]
        return None
