"""Pure ASGI middleware around every route: request id (``X-Request-ID`` in and out), one
access-log line per request, and a JSON answer where the server itself would give up."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.ingress.errors import CLIENT_GONE, internal_error_message, send_error

access_log = logging.getLogger("service.access")
log = logging.getLogger("service.ingress")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_QUIET_PATHS = ("/v2/health/", "/metrics", "/static/")


def header(scope: Scope, name: bytes) -> bytes:
    """The first value of a (lower-case) request header, b"" when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        text = header(scope, b"x-request-id").decode("latin-1")
        rid = text if _REQUEST_ID.match(text) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        status = 0
        started = False
        body_done = not _has_body(scope)
        t0 = time.perf_counter()

        async def receive_tracked() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
                if not body_done and not any(k == b"connection" for k, _ in headers):
                    # Answered before the body arrived (refused, timed out): the connection
                    # closes after this answer, and the client must know not to reuse it.
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive_tracked, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the drain timeout runs out; answer
            # like any other shutdown refusal instead of its plain-text 500.
            if started:
                raise
            await send_error(
                scope,
                send_with_id,
                "shutting_down",
                "the service stopped before this request finished; retry",
                {"Retry-After": "1", "Connection": "close"},
            )
        except Exception as exc:
            # Here, inside the request's context, the log line and the answer both carry the
            # request id (Starlette's own last-resort handler runs outside this middleware).
            if started:
                raise
            log.error("unhandled error", exc_info=exc)
            await send_error(scope, send_with_id, "internal_error", internal_error_message())
        finally:
            state = scope.get("state") or {}
            if state.get("client_gone"):
                status = CLIENT_GONE
            path = scope.get("path", "")
            fields = {
                "method": scope.get("method"),
                "path": path,
                "status": status,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
            }
            if "images" in state:
                fields["images"] = state["images"]
            if "error_code" in state:
                fields["code"] = state["error_code"]
            quiet = path.startswith(_QUIET_PATHS) and status < 400
            access_log.log(logging.DEBUG if quiet else logging.INFO, "request", extra=fields)
            logs.request_id.reset(token)
