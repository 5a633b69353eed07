"""The HTTP side of the service's one error family (:mod:`service.errors`): its handlers,
and the answers middleware sends before any route runs. Every error answer is made by
:func:`error_content`, which picks the body shape from the path once (docs/design.md §5);
every 500 hides its cause from the caller (it is logged with the request id, which the
answer carries instead)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope, Send

from service import logs
from service.errors import HIDDEN_CAUSE, ServiceError, code_of_status, error_content, status_of

log = logging.getLogger("service.ingress")

CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never sent

# The ingress raises the one family's errors under the name the rest of it knows.
ApiError = ServiceError


class ClientGoneError(Exception):
    """The caller disconnected before its answer was ready (logged as 499)."""


def internal_error_message() -> str:
    rid = logs.request_id.get() or "unknown"
    return f"internal error; the service log has the details under request id {rid}"


def _respond(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request.state.error_code = code
    return JSONResponse(
        error_content(request.url.path, code, message), status_code=status, headers=headers
    )


async def send_error(
    scope: Scope, send: Send, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """An error answer straight over ASGI, for middleware that answers before (or instead of)
    any route."""
    scope.setdefault("state", {})["error_code"] = code
    body = json.dumps(error_content(scope.get("path", ""), code, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status_of(code), "headers": raw})
    await send({"type": "http.response.body", "body": body})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500 and exc.code in HIDDEN_CAUSE:
            log.error("request failed", extra={"code": exc.code, "cause": exc.message})
            return _respond(request, exc.status, exc.code, internal_error_message(), exc.headers)
        return _respond(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ClientGoneError)
    async def _client_gone(request: Request, exc: ClientGoneError) -> Response:
        request.app.state.ingress.http_metrics.client_gone(request.url.path)
        request.state.client_gone = True
        request.state.error_code = "client_gone"
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
        return _respond(request, 422, "invalid_parameter", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = code_of_status(exc.status_code)
        return _respond(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _respond(request, 500, "internal_error", internal_error_message())
