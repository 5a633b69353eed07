"""uvicorn's httptools protocol with the limits it lacks: header size (431), time to send the
headers (408, or a silent close for a connection that never spoke), connections per worker
(the longest-idle one is closed first), no connection held open by a body nobody reads, JSON
where uvicorn would answer plain text (a request it cannot parse), and a lingering close.

The lingering close: an answer sent before the request body has been read (a 413, a 401, a
431) must not be followed by ``close()`` at once. The kernel answers a close with unread bytes
in the receive buffer with a reset, and a client still uploading then loses the answer that was
already on its way ("connection reset by peer" instead of the 413 it should act on). So every
close first half-closes (FIN after the answer), reads and discards whatever the client still
sends, and closes when the client does, or after a bound in time or bytes.

Selected with uvicorn's ``http=`` option by import string, so each worker builds it itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_content, reason
from service.metrics import http_metrics
from service.settings import load_settings

log = logging.getLogger("service.http")


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int
    linger_bytes: int


# Long enough for a client's send buffer and a round trip to drain on a loaded machine; short
# enough that a client which never stops sending holds a connection slot only briefly.
LINGER_S = 2.0


@functools.cache
def limits() -> HttpLimits:
    s = load_settings()
    return HttpLimits(s.max_header_bytes, s.header_timeout_s, s.max_connections, s.max_body_bytes)


def raw_json_response(status: int, code: str, message: str) -> bytes:
    body = json.dumps(error_content("", code, message)).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason(status), len(body))
    )
    return head + body


class LingeringTransport:
    """The connection's transport as uvicorn and this protocol see it: ``close()`` lingers
    (see the module's docstring); everything else is the real transport's."""

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger_bytes: int
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._discard_left = linger_bytes
        self._timer: asyncio.TimerHandle | None = None
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        if not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # sent once the answer ahead of it is written
        self._transport.resume_reading()  # uvicorn pauses reading while a body waits unread
        self._timer = self._loop.call_later(LINGER_S, self._transport.close)

    def discard(self, data: bytes) -> None:
        """Bytes that arrived after the answer: dropped, and the connection closed once the
        client has sent more than a request body may hold."""
        self._discard_left -= len(data)
        if self._discard_left < 0:
            self._transport.close()

    def close_now(self) -> None:
        """For a connection with nothing unread (idle, evicted): no reason to wait."""
        self._transport.close()

    def closed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits()
        self._in_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_since = time.monotonic()

    # ----------------------------------------------------------------- connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._lingering = LingeringTransport(transport, self.loop, limits().linger_bytes)
        super().connection_made(self._lingering)  # type: ignore[arg-type]
        if len(self.connections) > self._limits.max_connections and not self._evict_idle():
            self._refuse(
                503,
                "too_many_connections",
                f"this worker holds {self._limits.max_connections} busy connections "
                "(SERESNET_MAX_CONNECTIONS); retry",
            )
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._lingering.closed()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # A drain closes idle keep-alive connections: nothing unread, so nothing to wait for
        # (uvicorn's own eof_received lets asyncio finish a lingering close when the client's
        # FIN arrives).
        if self.cycle is None or self.cycle.response_complete:
            self._lingering.close_now()
        else:
            super().shutdown()

    def _idle(self) -> bool:
        return (
            self._in_headers
            and self._header_bytes == 0
            and (self.cycle is None or self.cycle.response_complete)
        )

    def _evict_idle(self) -> bool:
        """Close the connection idle the longest (keep-alive or never spoke), if any."""
        idle = [
            c
            for c in self.connections
            if c is not self and isinstance(c, GuardedHttpToolsProtocol) and c._idle()
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._idle_since)
        http_metrics().refused("idle_evicted")
        victim._lingering.close_now()
        return True

    # ----------------------------------------------------------------- headers

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self._limits.header_timeout_s, self._header_timeout
            )

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._in_headers:
            return
        if self._header_bytes:
            self._refuse(
                408,
                "request_timeout",
                f"the request headers did not arrive within "
                f"{self._limits.header_timeout_s:g} s (SERESNET_HEADER_TIMEOUT_S)",
            )
        else:
            http_metrics().refused("idle_timeout")
            self._lingering.close_now()

    def data_received(self, data: bytes) -> None:
        if self._lingering.lingering:
            self._lingering.discard(data)
            return
        if self._in_headers:
            if self._header_bytes > self._limits.max_header_bytes:
                return  # refused already; ignore what is still in flight
            self._header_bytes += len(data)
            self._arm_header_timer()
        super().data_received(data)
        if (
            self._in_headers
            and self._header_bytes > self._limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._refuse(
                431,
                "headers_too_large",
                f"request line and headers exceed {self._limits.max_header_bytes} "
                "bytes (SERESNET_MAX_HEADER_BYTES)",
            )

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        body_unread = self.cycle is not None and self.cycle.more_body
        super().on_response_complete()
        self._in_headers = True
        self._header_bytes = 0
        self._idle_since = time.monotonic()
        if body_unread and not self.transport.is_closing():
            # Answered before its body arrived (an error, say): the rest of the body could
            # trickle in forever and each byte would re-arm the keep-alive timer.
            self.transport.close()

    # ----------------------------------------------------------------- answers

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "bad_request", f"invalid HTTP request: {msg}")

    def _refuse(self, status: int, code: str, message: str) -> None:
        http_metrics().refused(code)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else None
        log.info("refused", extra={"status": status, "code": code, "client": client})
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self.transport.write(raw_json_response(status, code, message))
            self.transport.close()
