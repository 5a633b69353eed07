"""The API key gate: pure ASGI, in front of every route (the OpenAPI schema and its pages
included) but the health checks and the browser page's static files, which hold no data."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.ingress.errors import send_error
from service.ingress.middleware import header

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
OPEN_PREFIXES = ("/static/",)
OPEN_EXACT = ("/", "/favicon.ico")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path in OPEN_EXACT or path.startswith(OPEN_PREFIXES)


class ApiKeyGate:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = b"bearer " + api_key.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        scheme, _, token = header(scope, b"authorization").partition(b" ")
        candidate = scheme.lower() + b" " + token.strip()
        if hmac.compare_digest(candidate, self._expected):
            await self.app(scope, receive, send)
            return
        await send_error(
            scope,
            send,
            "unauthorized",
            "send the API key as 'Authorization: Bearer KEY'",
            {"WWW-Authenticate": "Bearer"},
        )
