"""The one closed-loop load generator of every HTTP benchmark in bench/ (load, v2_load,
frontend, peers), so their numbers count the same thing.

Each simulated user sends its next request as soon as the last one is answered. The counting
window opens ``warmup_s`` after the start and lasts ``duration_s``: a request counts when it
*finishes* inside the window (throughput is completions per second of window, the way a
server's own counters see it; latencies are those requests'), and users stop sending at the end.

:func:`raw_http_users` is the cheapest client there is: one keep-alive HTTP/1.1 connection per
user over asyncio streams, every request's bytes built once up front, so the generator spends
the (shared) CPU on sending rather than on a client library's bookkeeping. Any other client
(tritonclient, gRPC) plugs in as a :data:`Send`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np

# One user's request: the request's number for that user -> images answered (raise on failure).
Send = Callable[[int], Awaitable[int]]


@dataclass
class Round:
    label: str
    concurrency: int
    seconds: float
    requests: int
    images: int
    errors: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    first_error: str | None = None
    samples: list[float] = field(default_factory=list, repr=False)  # latencies, seconds

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["samples"]
        return d


def percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds ({} without samples)."""
    if not latencies_s:
        return {}
    ms = np.asarray(latencies_s) * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p90": round(float(np.percentile(ms, 90)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "mean": round(float(ms.mean()), 3),
    }


async def closed_loop(
    senders: Sequence[Send], warmup_s: float, duration_s: float, label: str = ""
) -> Round:
    """Run one user per sender for ``warmup_s + duration_s`` and count the window (above)."""
    start = time.perf_counter()
    window_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    latencies: list[float] = []
    counts = {"images": 0, "errors": 0}
    first_error: list[str] = []

    async def user(send: Send) -> None:
        n = 0
        while (t0 := time.perf_counter()) < stop_at:
            try:
                images, ok = await send(n), True
            except Exception as e:  # a failed request is counted, never fatal to the run
                images, ok = 0, False
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}"[:300])
            t1 = time.perf_counter()
            n += 1
            if window_from <= t1 <= stop_at:
                if ok:
                    latencies.append(t1 - t0)
                    counts["images"] += images
                else:
                    counts["errors"] += 1

    await asyncio.gather(*(user(s) for s in senders))
    return Round(
        label=label,
        concurrency=len(senders),
        seconds=duration_s,
        requests=len(latencies),
        images=counts["images"],
        errors=counts["errors"],
        requests_per_s=round(len(latencies) / duration_s, 2),
        images_per_s=round(counts["images"] / duration_s, 2),
        latency_ms=percentiles(latencies),
        first_error=first_error[0] if first_error else None,
        samples=latencies,
    )


def run(senders: Sequence[Send], warmup_s: float, duration_s: float, label: str = "") -> Round:
    return asyncio.run(closed_loop(senders, warmup_s, duration_s, label))


# ----------------------------------------------------------------------------- raw HTTP/1.1


def http_request(
    url: str, path: str, body: bytes, headers: dict[str, str], method: str = "POST"
) -> bytes:
    """The bytes of one keep-alive HTTP/1.1 request to ``url``'s host."""
    host = urlsplit(url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Response(NamedTuple):
    status: int
    body: bytes
    close: bool  # the server said ``Connection: close``: the connection ends here


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response, its body framed by Content-Length or chunked (without trailers)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length, chunked, close = 0, False, head.startswith(b"HTTP/1.0")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            close = value == b"close" or (close and value != b"keep-alive")
    if not chunked:
        return Response(status, await reader.readexactly(length), close)
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return Response(status, bytes(body), close)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


class HttpError(RuntimeError):
    pass


def raw_http_users(
    url: str,
    requests: Sequence[bytes],
    concurrency: int,
    images_per_request: int = 1,
    check: Callable[[int, bytes], None] | None = None,
    timeout_s: float = 300.0,
) -> list[Send]:
    """``concurrency`` senders, each on its own keep-alive connection, user ``k`` sending
    ``requests[k], requests[k + concurrency], ...`` (cycling). A status other than 200 (or
    ``check(status, body)`` raising) is an error. A request that fails on the wire (dropped
    connection, malformed response, no answer within ``timeout_s``) also drops the connection:
    its stream is in an unknown state, so the user's next request opens a new one."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    def make(k: int) -> Send:
        conn: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        def hang_up() -> None:
            if conn:
                conn.pop()[1].close()

        async def exchange(data: bytes) -> Response:
            if not conn:
                conn.append(await asyncio.open_connection(host, port))
            reader, writer = conn[0]
            writer.write(data)
            await writer.drain()
            return await read_response(reader)

        async def send(n: int) -> int:
            try:
                async with asyncio.timeout(timeout_s):
                    status, body, close = await exchange(
                        requests[(k + n * concurrency) % len(requests)]
                    )
            except BaseException:
                hang_up()
                raise
            if close:
                hang_up()
            if check is not None:
                check(status, body)
            elif status != 200:
                raise HttpError(f"HTTP {status}: {body[:200]!r}")
            return images_per_request

        return send

    return [make(k) for k in range(concurrency)]


def positive_ints(text: str) -> list[int]:
    """``--concurrency 1,16,64``: a comma-separated list of positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def names_among(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated list of some of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if not names or set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"choose among {', '.join(choices)}")
        return names

    return parse
