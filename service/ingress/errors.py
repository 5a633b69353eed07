"""Typed errors of the HTTP side and their handlers: every error body is
``{"error": {"code", "message"}}`` (docs/design.md §5) and every 500 hides its cause from the
caller (it is logged with the request id, which the answer carries instead)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import logs
from service.errors import ServiceError

log = logging.getLogger("service.ingress")

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
                 405: "method_not_allowed", 408: "request_timeout", 413: "body_too_large",
                 415: "unsupported_media_type", 422: "invalid_parameter", 431:
                 "headers_too_large"}


class ApiError(ServiceError):
    """Ends the request with its error response."""


class ClientGoneError(Exception):
    """The caller disconnected before its answer was ready (logged as 499)."""


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def internal_error_message() -> str:
    rid = logs.request_id.get() or "unknown"
    return f"internal error; the service log has the details under request id {rid}"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        request.state.error_code = exc.code
        if exc.status >= 500 and exc.code in ("internal_error", "inference_failed"):
            log.error("request failed", extra={"code": exc.code, "cause": exc.message})
            return error_response(exc.status, exc.code, internal_error_message(), exc.headers)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
        request.state.error_code = "invalid_parameter"
        return error_response(422, "invalid_parameter", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        request.state.error_code = code
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        request.state.error_code = "internal_error"
        return error_response(500, "internal_error", internal_error_message())
