"""HTTP framing attacks against a real service: header and URL limits whatever the write
pattern, trailers, an API key sent only as a trailer, WebSocket upgrades, and a flood of
connections that trickle their headers. Each gets a JSON refusal (or a closed connection) in
bounded time while a bystander on the same worker keeps being served."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from testkit.attack import classify_small
from testkit.processes import peak_rss_mb, reset_peaks
from testkit.server import EMBEDDED_MODEL, ServiceProcess, running_service

pytestmark = pytest.mark.e2e

KEY = "k3y-hostile-http"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 32 * 1024  # the default SERESNET_MAX_HEADER_BYTES


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_API_KEY": KEY,
        "SERESNET_MAX_CONNECTIONS": "60",
        "SERESNET_HEADER_TIMEOUT_S": "30",
    }
    with running_service(EMBEDDED_MODEL, env=env) as s:
        yield s


def addr(svc: ServiceProcess) -> tuple[str, int]:
    parts = urlsplit(svc.url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def responses(sock: socket.socket, timeout: float = 20) -> list[tuple[int, dict[str, str], bytes]]:
    """Every response the server sends until it closes (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    out = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def send_raw(svc: ServiceProcess, payload: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    with socket.create_connection(addr(svc)) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        return responses(sock)


def bystander_during(svc: ServiceProcess, work) -> tuple[object, float, float]:  # type: ignore[no-untyped-def]
    """Run ``work()`` while a bystander classifies in a loop: (result, seconds, worst latency)."""
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", work()))
    latencies = []
    t0 = time.monotonic()
    t.start()
    with httpx.Client(timeout=60, headers=AUTH) as client:
        while t.is_alive():
            latencies.append(classify_small(svc, client))
            time.sleep(0.05)
    t.join()
    return result.get("r"), time.monotonic() - t0, max(latencies, default=0.0)


def assert_json_refusal(resp: tuple[int, dict[str, str], bytes], status: int, code: str) -> None:
    got, headers, body = resp
    assert got == status, (got, body)
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code


@pytest.mark.parametrize("size", [64 * 1024, 100 * 1024])
def test_one_huge_header_in_a_single_write_is_431(svc: ServiceProcess, size: int) -> None:
    host, _ = addr(svc)
    payload = (
        f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * size}\r\n\r\n".encode()
    )
    reset_peaks(svc.proc.pid)
    answers, seconds, stall = bystander_during(svc, lambda: send_raw(svc, payload))
    assert isinstance(answers, list) and len(answers) == 1
    assert_json_refusal(answers[0], 431, "headers_too_large")
    assert seconds < 10 and stall < 3
    assert max(peak_rss_mb(svc.proc.pid).values()) < 1024


def test_headers_pipelined_behind_a_small_request_are_431_after_its_answer(
    svc: ServiceProcess,
) -> None:
    host, _ = addr(svc)
    small = f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    big = f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\n".encode() + b"".join(
        b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(200)
    )
    answers = send_raw(svc, small + big + b"\r\n")
    assert [a[0] for a in answers] == [200, 431], answers
    assert_json_refusal(answers[1], 431, "headers_too_large")


def test_a_long_url_is_414(svc: ServiceProcess) -> None:
    host, _ = addr(svc)
    payload = f"GET /v2/health/live?{'q' * 40_000} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    (answer,) = send_raw(svc, payload)
    assert_json_refusal(answer, 414, "uri_too_long")


def chunked_post(host: str, headers: str = "") -> bytes:
    return (
        f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n{headers}"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"4\r\nabcd\r\n0\r\n"


def test_huge_trailers_are_refused_and_nothing_is_kept(svc: ServiceProcess) -> None:
    host, _ = addr(svc)
    auth = f"Authorization: Bearer {KEY}\r\n"

    def attack() -> list[tuple[int, dict[str, str], bytes]]:
        with socket.create_connection(addr(svc)) as sock:
            try:
                sock.sendall(chunked_post(host, auth))
                trailer = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000) for i in range(1000))
                for _ in range(500):  # up to 500 MB; the server stops reading far sooner
                    sock.sendall(trailer)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return responses(sock)

    reset_peaks(svc.proc.pid)
    answers, seconds, stall = bystander_during(svc, attack)
    assert isinstance(answers, list)
    assert len(answers) == 1, answers
    assert_json_refusal(answers[0], 431, "headers_too_large")
    assert seconds < 20 and stall < 3
    assert max(peak_rss_mb(svc.proc.pid).values()) < 400


def test_an_api_key_sent_only_as_a_trailer_is_no_key(svc: ServiceProcess) -> None:
    host, _ = addr(svc)
    payload = chunked_post(host) + f"Authorization: Bearer {KEY}\r\n\r\n".encode()
    (answer,) = send_raw(svc, payload)
    assert_json_refusal(answer, 401, "unauthorized")


def test_a_websocket_upgrade_gets_a_json_answer(svc: ServiceProcess) -> None:
    host, _ = addr(svc)
    payload = (
        f"GET /classify HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {KEY}\r\n\r\n"
    ).encode()
    (answer,) = send_raw(svc, payload)
    status, headers, body = answer
    assert status in (400, 405, 426), answer
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"]


def test_a_flood_of_slow_header_senders_does_not_lock_clients_out(svc: ServiceProcess) -> None:
    """Three times the connection limit, each sending a header byte every 0.5 s: the slowest
    are cut to make room, so every real request is answered 200."""
    host, port = addr(svc)
    stop = threading.Event()
    socks: list[socket.socket] = []

    def flood() -> None:
        for _ in range(180):
            try:
                s = socket.create_connection((host, port))
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(s)
            except OSError:
                pass
        while not stop.is_set():
            for s in list(socks):
                try:
                    s.send(b"a")
                except OSError:
                    socks.remove(s)
            time.sleep(0.5)

    t = threading.Thread(target=flood)
    t.start()
    try:
        time.sleep(3)
        statuses = []
        latencies = []
        for _ in range(20):
            t0 = time.monotonic()
            try:
                statuses.append(httpx.get(f"{svc.url}/v2/health/ready", timeout=10).status_code)
            except httpx.HTTPError as e:
                statuses.append(type(e).__name__)
            latencies.append(time.monotonic() - t0)
            time.sleep(0.1)
    finally:
        stop.set()
        t.join()
        for s in socks:
            s.close()
    assert statuses == [200] * 20, statuses
    assert max(latencies) < 3, latencies


def test_health_answers_head(svc: ServiceProcess) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = httpx.head(f"{svc.url}{path}", timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert r.content == b""


def test_repeated_wrong_keys_are_slowed_down_but_the_right_key_is_not() -> None:
    """One connection guessing in a loop (4,400-7,700 guesses/s before), then 60 guesses at
    once: a burst of ten, then about two a second, 429 beyond five seconds of backlog; the
    right key from the same address meanwhile is answered at once."""
    env = {"SERESNET_WORKERS": "1", "SERESNET_API_KEY": KEY}
    with running_service(EMBEDDED_MODEL, env=env) as s:
        url = f"{s.url}/v2/models"
        with httpx.Client(timeout=30) as client:
            t0 = time.monotonic()
            statuses = [
                client.get(url, headers={"Authorization": f"Bearer guess{i}"}).status_code
                for i in range(16)
            ]
            sequential = time.monotonic() - t0
        assert statuses == [401] * 16
        assert sequential > 2.0, f"16 wrong keys in {sequential:.2f} s"

        results: list[int] = []
        shared = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=100))

        def guess(i: int) -> None:
            results.append(shared.get(url, headers={"Authorization": f"Bearer p{i}"}).status_code)

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(60)]
        with shared, httpx.Client(timeout=30) as right:
            right.get(f"{s.url}/v2/health/live")
            for t in threads:
                t.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            assert right.get(url, headers=AUTH).status_code == 200
            assert time.monotonic() - t0 < 2
            for t in threads:
                t.join()
        assert set(results) <= {401, 429}
        assert results.count(429) >= 30, results
        assert results.count(401) <= 15, results
