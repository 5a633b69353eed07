"""uvicorn's httptools protocol with the limits it lacks: URL (414) and header size (431)
counted per request from the parser's own callbacks, so no write pattern slips past (one huge
write, headers pipelined behind another request), trailers bounded by the same limit and never
passed on (a key in a trailer is no key), time to send the headers (408, or a silent close for
a connection that never spoke), connections per worker (the longest-idle one is closed first,
then the slowest still sending its headers), no connection held open by a body nobody reads,
no WebSocket upgrade (the routes answer such a request as plain HTTP, in JSON), JSON where
uvicorn would answer plain text (a request it cannot parse), and a lingering close.

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


class _LimitExceededError(Exception):
    """Raised from a parser callback: httptools stops parsing and uvicorn calls
    :meth:`GuardedHttpToolsProtocol.send_400_response`, which answers with the refusal."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits()
        self._in_headers = True
        self._header_bytes = 0
        self._header_started = time.monotonic()
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_since = time.monotonic()
        # Per message, from the parser's callbacks (a pipelined message has its own).
        self._url_bytes = 0
        self._field_bytes = 0
        self._message_headers_done = False
        self._refusal: tuple[int, str, str] | None = None
        self._pending_refusal: tuple[int, str, str] | None = None

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
        """Close the connection idle the longest (keep-alive or never spoke), else the one
        sending its headers the slowest, if any: a flood of connections that trickle header
        bytes cannot keep real clients out."""
        others = [
            c for c in self.connections if c is not self and isinstance(c, GuardedHttpToolsProtocol)
        ]
        idle = [c for c in others if c._idle()]
        if idle:
            victim = min(idle, key=lambda c: c._idle_since)
            http_metrics().refused("idle_evicted")
            victim._lingering.close_now()
            return True
        now = time.monotonic()
        sending = [c for c in others if c._sending_headers()]
        if not sending:
            return False
        slowest = min(sending, key=lambda c: c._header_rate(now))
        slowest._refuse(
            408,
            "request_timeout",
            "closed to make room: this worker is full and these headers were the slowest "
            "(SERESNET_MAX_CONNECTIONS)",
        )
        return True

    def _sending_headers(self) -> bool:
        return (
            self._in_headers
            and self._header_bytes > 0
            and (self.cycle is None or self.cycle.response_complete)
            and not self.transport.is_closing()
        )

    def _header_rate(self, now: float) -> float:
        return self._header_bytes / max(now - self._header_started, 1e-3)

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
            if self._header_bytes == 0:
                self._header_started = time.monotonic()
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

    def on_message_begin(self) -> None:
        self._url_bytes = 0
        self._field_bytes = 0
        self._message_headers_done = False
        super().on_message_begin()

    def _over(self, status: int, code: str, message: str) -> None:
        self._refusal = (status, code, message)
        raise _LimitExceededError

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        limit = self._limits.max_header_bytes
        if self._url_bytes > limit:
            self._over(
                414, "uri_too_long", f"the URL exceeds {limit} bytes (SERESNET_MAX_HEADER_BYTES)"
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value) + 4
        limit = self._limits.max_header_bytes
        if self._message_headers_done:
            # A trailer: bounded like the headers, and dropped: the app has read its headers
            # already (a credential sent as a trailer must not count), and uvicorn would
            # otherwise keep every trailer in the request's header list.
            if self._field_bytes > limit:
                self._over(
                    431,
                    "headers_too_large",
                    f"trailers exceed {limit} bytes (SERESNET_MAX_HEADER_BYTES)",
                )
            return
        if self._url_bytes + self._field_bytes > limit:
            self._over(
                431,
                "headers_too_large",
                f"request line and headers exceed {limit} bytes (SERESNET_MAX_HEADER_BYTES)",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._message_headers_done = True
        self._field_bytes = 0
        self._disarm_header_timer()
        super().on_headers_complete()

    def _should_upgrade_to_ws(self) -> bool:
        # No route speaks WebSocket: an upgrade request is served as the HTTP request it also
        # is, so it gets the route's JSON answer (405 on /classify) instead of a bare 403.
        return False

    def _unsupported_upgrade_warning(self) -> None:
        pass  # uvicorn's warning is about installing a WebSocket library: not wanted here

    def on_response_complete(self) -> None:
        body_unread = self.cycle is not None and self.cycle.more_body
        super().on_response_complete()
        self._in_headers = True
        self._header_bytes = 0
        self._idle_since = time.monotonic()
        if self._pending_refusal is not None:
            pending, self._pending_refusal = self._pending_refusal, None
            self._refuse(*pending)
            return
        if body_unread and not self.transport.is_closing():
            # Answered before its body arrived (an error, say): the rest of the body could
            # trickle in forever and each byte would re-arm the keep-alive timer.
            self.transport.close()

    # ----------------------------------------------------------------- answers

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            self._refuse(400, "bad_request", f"invalid HTTP request: {msg}")

    def _refuse(self, status: int, code: str, message: str) -> None:
        cycle = self.cycle
        if (
            cycle is not None
            and not cycle.response_complete
            and (cycle.response_started or not self._message_headers_done)
        ):
            # An answer is under way (this request's, with trailers still coming; or the one
            # ahead of a pipelined request): it goes out whole, and the refusal follows it.
            self._pending_refusal = (status, code, message)
            self.flow.pause_reading()
            return
        http_metrics().refused(code)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else None
        log.info("refused", extra={"status": status, "code": code, "client": client})
        self._disarm_header_timer()
        if not self.transport.is_closing():
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(raw_json_response(status, code, message))
            self.transport.close()
