"""The API key gate: pure ASGI, in front of every route (the OpenAPI schema and its pages
included) but the health checks and the browser page's static files, which hold no data.
Wrong keys from one client address are throttled (a burst, then a steady rate, the 401
delayed to keep it; 429 once the delay would be long), so guessing is slow however many
connections it uses; a right key is never delayed."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict

from starlette.types import ASGIApp, Receive, Scope, Send

from service.ingress.errors import send_error
from service.ingress.middleware import header

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
OPEN_PREFIXES = ("/static/",)
OPEN_EXACT = ("/", "/favicon.ico")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path in OPEN_EXACT or path.startswith(OPEN_PREFIXES)


class FailureThrottle:
    """Generic cell rate per client address: ``burst`` failures at once, then one per
    ``1/rate`` s. :meth:`delay` says how long a failure waits before its answer, or None
    when that would exceed ``max_wait`` (refuse it now)."""

    def __init__(
        self,
        burst: int = 10,
        rate: float = 2.0,
        max_wait: float = 5.0,
        max_clients: int = 10_000,
    ) -> None:
        self.interval = 1.0 / rate
        self.tolerance = burst * self.interval
        self.max_wait = max_wait
        self.max_clients = max_clients
        self._tat: OrderedDict[str, float] = OrderedDict()  # theoretical arrival times

    def delay(self, client: str, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        tat = max(self._tat.get(client, now), now) + self.interval
        wait = tat - now - self.tolerance
        if wait > self.max_wait:
            return None
        self._tat[client] = tat
        self._tat.move_to_end(client)
        while len(self._tat) > self.max_clients:
            self._tat.popitem(last=False)  # the least recent: its debt is the oldest
        return max(0.0, wait)


class ApiKeyGate:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = b"bearer " + api_key.encode("ascii")
        self._throttle = FailureThrottle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        scheme, _, token = header(scope, b"authorization").partition(b" ")
        candidate = scheme.lower() + b" " + token.strip()
        if hmac.compare_digest(candidate, self._expected):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self._throttle.delay(client[0] if client else "")
        if wait is None:
            code, message = "too_many_attempts", "too many wrong API keys; retry later"
            headers = {"Retry-After": str(round(self._throttle.max_wait))}
        else:
            await asyncio.sleep(wait)
            code, message = "unauthorized", "send the API key as 'Authorization: Bearer KEY'"
            headers = {"WWW-Authenticate": "Bearer"}
        await send_error(scope, send, code, message, headers)
