"""Typed errors of the HTTP side and their handlers: every error body is
``{"error": {"code", "message"}}`` (docs/design.md §5), except under ``/v2``, where the Open
Inference Protocol says ``{"error": "<string>"}`` (tritonclient shows that string as its
exception's message, and would show the object as a dict); every 500 hides its cause from the
caller (it is logged with the request id, which the answer carries instead).

The handlers pick the shape from the path. Answers made before any route runs (the API key
gate, the shutdown refusal in :mod:`~service.ingress.middleware`) are reshaped on ``/v2`` by
:class:`V2ErrorShape`, an ASGI middleware outside them all."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.errors import ServiceError
from service.v2.errors import V2Error

log = logging.getLogger("service.ingress")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    431: "headers_too_large",
}


class ApiError(ServiceError):
    """Ends the request with its error response."""


class ClientGoneError(Exception):
    """The caller disconnected before its answer was ready (logged as 499)."""


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _respond(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    if is_v2_path(request.url.path):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return error_response(status, code, message, headers)


async def send_error(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """An error answer straight over ASGI, for middleware that answers before (or instead of)
    any route."""
    body = json.dumps(error_body(code, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def internal_error_message() -> str:
    rid = logs.request_id.get() or "unknown"
    return f"internal error; the service log has the details under request id {rid}"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        request.state.error_code = exc.code
        if exc.status >= 500 and exc.code in ("internal_error", "inference_failed"):
            log.error("request failed", extra={"code": exc.code, "cause": exc.message})
            return _respond(request, exc.status, exc.code, internal_error_message(), exc.headers)
        return _respond(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(V2Error)
    async def _v2_error(request: Request, exc: V2Error) -> JSONResponse:
        request.state.error_code = v2_error_code(exc)
        if exc.status == 500:  # a bug: its cause goes to the log, not to the caller
            log.error("request failed", extra={"code": "internal_error", "cause": exc.message})
            return _respond(
                request, exc.status, "internal_error", internal_error_message(), exc.headers
            )
        return _respond(request, exc.status, request.state.error_code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
        request.state.error_code = "invalid_parameter"
        return _respond(request, 422, "invalid_parameter", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        request.state.error_code = code
        return _respond(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        request.state.error_code = "internal_error"
        return _respond(request, 500, "internal_error", internal_error_message())


def v2_error_code(exc: V2Error) -> str:
    """A stable code for logs and metrics: the class name in snake case (``ShapeMismatch``
    -> ``shape_mismatch``); the protocol's body carries only the message."""
    name = type(exc).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class V2ErrorShape:
    """On ``/v2`` paths, turns a JSON error body ``{"error": {"code", "message"}}`` made
    outside the exception handlers into the protocol's ``{"error": message}``. Only error
    answers are buffered (they are small); every other answer streams through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_v2_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def reshaping_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                json_error = message["status"] >= 400 and headers.get(
                    b"content-type", b""
                ).startswith(b"application/json")
                if not json_error:
                    await send(message)
                    return
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _reshape(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshaping_send)


def _reshape(body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return json.dumps({"error": error["message"]}).encode()
    return body
