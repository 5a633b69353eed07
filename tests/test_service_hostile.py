"""Hostile traffic against a real ``python -m service``: files that take Pillow seconds to parse
or gigabytes to decode, oversized and slow headers, trickled bodies, floods of idle
connections, too many bytes in flight, clients that vanish mid-upload or half-close, a drain
that runs out of time, malformed HTTP, and the API key in front of the docs. Each case must
get a clear JSON answer (or a closed connection) and leave the service serving others."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from modelcard.schema import read_card
from testkit.images import encode, photo
from testkit.processes import peak_rss_mb
from testkit.server import EMBEDDED_MODEL, REPO_ROOT, ServiceProcess, running_service

pytestmark = pytest.mark.e2e

CARD = read_card(EMBEDDED_MODEL)
MAX_PARTS = 16


def small_png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "L"), "PNG")


def addr(svc: ServiceProcess) -> tuple[str, int]:
    parts = urlsplit(svc.url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from a raw socket (status, headers, body); reads until the body is
    complete or the server closes."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def raw_post_head(svc: ServiceProcess, length: int, ctype: str = "image/png") -> bytes:
    host, port = addr(svc)
    return (
        f"POST /classify HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def health_latency(svc: ServiceProcess) -> float:
    t0 = time.monotonic()
    assert httpx.get(f"{svc.url}/v2/health/live", timeout=30).status_code == 200
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_HEADER_TIMEOUT_S": "1",
        "SERESNET_REQUEST_TIMEOUT_S": "4",
        "SERESNET_MAX_HEADER_BYTES": "8192",
        "SERESNET_DECODE_MEMORY_MB": "256",
        "SERESNET_MAX_BODY_BYTES": str(40 * 2**20),
        "SERESNET_MAX_INFLIGHT_BODY_MB": "64",
        "SERESNET_MAX_IMAGES_PER_REQUEST": str(MAX_PARTS),
    }
    with running_service(EMBEDDED_MODEL, env=env) as s:
        yield s


def assert_serving(svc: ServiceProcess) -> None:
    r = httpx.post(
        f"{svc.url}/classify", files=[("images", ("ok.png", small_png(), "image/png"))], timeout=30
    )
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- parse bombs


def stuffed_jpeg(markers: int) -> bytes:
    """A real JPEG with ``markers`` empty (standalone TEM) markers after its SOI."""
    real = encode(photo(64, 64), "JPEG")
    return real[:2] + b"\xff\x01" * markers + real[2:]


def chunky_png(chunks: int) -> bytes:
    """A real PNG with ``chunks`` empty private ancillary chunks before its image data."""
    real = small_png()
    ihdr_end = 8 + 8 + 13 + 4
    empty = struct.pack(">I", 0) + b"prIv" + struct.pack(">I", zlib.crc32(b"prIv"))
    return real[:ihdr_end] + empty * chunks + real[ihdr_end:]


@pytest.mark.parametrize(
    "make",
    [lambda: stuffed_jpeg(7_500_000), lambda: chunky_png(2_500_000)],
    ids=["jpeg-7.5M-markers", "png-2.5M-chunks"],
)
def test_header_walk_bombs_are_refused_fast_and_stall_nothing(svc: ServiceProcess, make) -> None:  # type: ignore[no-untyped-def]
    body = make()
    assert len(body) > 14 * 2**20
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        result["r"] = httpx.post(
            f"{svc.url}/classify",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
            timeout=60,
        )

    t = threading.Thread(target=send)
    t0 = time.monotonic()
    t.start()
    latencies = []
    while t.is_alive():
        latencies.append(health_latency(svc))
        time.sleep(0.05)
    t.join()
    elapsed = time.monotonic() - t0
    r = result["r"]
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "corrupt_image"
    assert "markers" in r.json()["error"]["message"] or "chunks" in r.json()["error"]["message"]
    assert elapsed < 4, f"took {elapsed:.1f} s"
    assert max(latencies, default=0) < 1.0, latencies
    assert_serving(svc)


# ----------------------------------------------------------------------------- decode memory


@pytest.fixture(scope="module")
def webp_bomb() -> bytes:
    """1-2 KB on disk, 6300x6300 RGBA when decoded (159 MB of pixels, far more converted)."""
    return encode(Image.new("RGBA", (6300, 6300), (10, 200, 30, 128)), "WEBP", lossless=True)


def png16_rgba(width: int, height: int) -> bytes:
    """A 16-bit RGBA PNG of zeros, compressed row by row (never held whole in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + width * 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def worker_peak_rss_mb(svc: ServiceProcess) -> float:
    """The largest peak RSS (VmHWM) of the service's processes."""
    return max(peak_rss_mb(svc.proc.pid).values())


def test_tiny_files_that_decode_huge_are_refused_with_413(
    svc: ServiceProcess, webp_bomb: bytes
) -> None:
    assert len(webp_bomb) < 4096
    files = [("images", (f"bomb{i}.webp", webp_bomb, "image/webp")) for i in range(4)]
    files.append(("images", ("ok.png", small_png(), "image/png")))
    r = httpx.post(f"{svc.url}/classify", files=files, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x.get("error", {}).get("code") for x in results[:4]] == ["image_too_large"] * 4
    assert "SERESNET_DECODE_MEMORY_MB" in results[0]["error"]["message"]
    assert results[4]["predictions"]
    png16 = png16_rgba(6000, 6000)
    assert len(png16) < 1_000_000
    r = httpx.post(
        f"{svc.url}/classify", content=png16, headers={"Content-Type": "image/png"}, timeout=60
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
    assert worker_peak_rss_mb(svc) < 600


def test_a_bomb_that_fits_the_budget_is_decoded_one_at_a_time() -> None:
    """With room for one, four WebP bombs are decoded in turn: the worker's peak stays near
    one decode, far below the 4.5 GB four at once took."""
    bomb = encode(Image.new("RGBA", (6300, 6300), (10, 200, 30, 128)), "WEBP", lossless=True)
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_DECODE_MEMORY_MB": "1536",
        "SERESNET_PREPROCESS_THREADS": "4",
        "SERESNET_REQUEST_TIMEOUT_S": "300",
    }
    with running_service(EMBEDDED_MODEL, env=env) as s:
        files = [("images", (f"bomb{i}.webp", bomb, "image/webp")) for i in range(4)]
        with httpx.Client(timeout=300) as client:
            r = client.post(f"{s.url}/classify", files=files)
        assert r.status_code == 200, r.text
        assert all(x.get("predictions") for x in r.json()["results"])
        assert worker_peak_rss_mb(s) < 1500


# ----------------------------------------------------------------------------- HTTP limits


def test_oversized_headers_get_431(svc: ServiceProcess) -> None:
    host, port = addr(svc)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\n".encode())
        try:
            for _ in range(100):  # up to 1 MB of headers; the server stops us long before
                sock.sendall(b"X-Junk: " + b"a" * 10_000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = read_response(sock)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    assert_serving(svc)


def test_slow_headers_get_408_and_silent_connections_are_closed(svc: ServiceProcess) -> None:
    host, port = addr(svc)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        t0 = time.monotonic()
        status, _, body = read_response(sock)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert time.monotonic() - t0 < 5
        assert closed_by_server(sock)
    with socket.create_connection((host, port)) as sock:  # never says anything
        assert closed_by_server(sock, timeout=10)


def test_a_trickled_body_gets_408_within_the_request_timeout(svc: ServiceProcess) -> None:
    host, port = addr(svc)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(raw_post_head(svc, 10_000))
        t0 = time.monotonic()
        sock.settimeout(0.2)
        status = None
        while time.monotonic() - t0 < 20:
            try:
                sock.sendall(b"x")
                data = sock.recv(65536, socket.MSG_PEEK)
                if data:
                    status, headers, body = read_response(sock)
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.monotonic() - t0
        assert status == 408, status
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert headers.get("connection") == "close"
        assert elapsed < 6
        assert closed_by_server(sock)


def test_an_answer_sent_before_the_body_is_read_reaches_a_client_still_uploading(
    svc: ServiceProcess,
) -> None:
    """Too many parts, refused with 413 at the first part over the limit while 8 MB of the
    body are still to come. Closing at once would make the kernel reset the connection (unread
    bytes), destroying the 413 on its way; the lingering close reads the rest and lets the
    client finish its upload and read the answer, every time."""
    boundary = "b0undary"
    part = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=images; filename=x.png\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    parts = [part + small_png(i) + b"\r\n" for i in range(MAX_PARTS + 1)]
    tail = part + b"\0" * (8 * 2**20) + f"\r\n--{boundary}--\r\n".encode()
    body = b"".join(parts) + tail
    ctype = f"multipart/form-data; boundary={boundary}"
    for _ in range(3):
        with socket.create_connection(addr(svc)) as sock:
            sock.sendall(raw_post_head(svc, len(body), ctype) + body)  # no reset mid-upload
            status, headers, answer = read_response(sock)
            assert status == 413, answer
            assert json.loads(answer)["error"]["code"] == "too_many_images"
            assert headers.get("connection") == "close"
            assert closed_by_server(sock)
    assert_serving(svc)


def test_malformed_http_gets_json_400(svc: ServiceProcess) -> None:
    host, port = addr(svc)
    for raw in (
        b"GARBAGE\x01 / HTTP/1.1\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ):
        with socket.create_connection((host, port)) as sock:
            sock.sendall(raw)
            status, headers, body = read_response(sock)
        assert status == 400
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "bad_request"


def test_bytes_in_flight_are_bounded(svc: ServiceProcess) -> None:
    """Each held upload keeps its bytes; beyond the worker's budget (64 MB) a new one is
    refused with 503 at once instead of growing the process."""
    host, port = addr(svc)
    held = []
    size = 30 * 2**20
    try:
        for _ in range(2):  # 2 x 30 MB held, each 1 byte short of complete
            sock = socket.create_connection((host, port))
            sock.sendall(raw_post_head(svc, size) + b"\0" * (size - 1))
            held.append(sock)
        time.sleep(0.5)
        with socket.create_connection((host, port)) as sock:
            sock.sendall(raw_post_head(svc, size))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"\0" * size)
            status, headers, body = read_response(sock)
        assert status == 503
        assert json.loads(body)["error"]["code"] == "busy"
        assert int(headers["retry-after"]) >= 1
    finally:
        for sock in held:
            sock.close()
    assert_serving(svc)


# ----------------------------------------------------------------------------- clients gone


def test_a_client_gone_mid_upload_is_a_counted_499_without_tracebacks(svc: ServiceProcess) -> None:
    before = svc.metric("seresnet_client_gone_total", path="/classify")
    host, port = addr(svc)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(raw_post_head(svc, 100_000) + b"\0" * 50_000)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while svc.metric("seresnet_client_gone_total", path="/classify") == before:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    records = svc.log_records()
    gone = [r for r in records if r.get("event") == "request" and r.get("status") == 499]
    assert gone and gone[-1].get("code") == "client_gone"
    assert not any("exception" in r or r.get("level") == "error" for r in records), svc.log_text()[
        -3000:
    ]


def test_a_client_that_half_closes_is_client_gone() -> None:
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_MAX_BATCH_SIZE": "64",
        "SERESNET_MAX_QUEUE_DELAY_MS": "3000",
    }
    with running_service(EMBEDDED_MODEL, env=env) as s:
        body = small_png()
        with socket.create_connection(addr(s)) as sock:
            sock.sendall(raw_post_head(s, len(body)) + body)
            sock.shutdown(socket.SHUT_WR)
            assert closed_by_server(sock)
        deadline = time.monotonic() + 10
        while s.metric("seresnet_client_gone_total", path="/classify") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Gone before its image was run (uvicorn reports the disconnect even before the
        # buffered body is read, so it may not even have been admitted): nothing ran for it.
        assert s.metric("seresnet_inference_count_total") == 0
        assert any(r.get("status") == 499 for r in s.log_records() if r.get("event") == "request")


# ----------------------------------------------------------------------------- connections


def test_a_flood_of_idle_connections_does_not_starve_clients() -> None:
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_MAX_CONNECTIONS": "50",
        "SERESNET_HEADER_TIMEOUT_S": "60",
    }
    with running_service(EMBEDDED_MODEL, env=env) as s:
        idle = [socket.create_connection(addr(s)) for _ in range(300)]
        try:
            t0 = time.monotonic()
            for i in range(5):
                r = httpx.post(
                    f"{s.url}/classify",
                    files=[("images", ("ok.png", small_png(i), "image/png"))],
                    timeout=10,
                )
                assert r.status_code == 200
            assert time.monotonic() - t0 < 5
            closed = sum(closed_by_server(sock, timeout=0.01) for sock in idle)
            assert closed >= 250 - 5
        finally:
            for sock in idle:
                sock.close()
        assert s.metric("seresnet_http_refused_total", reason="idle_evicted") >= 250


# ----------------------------------------------------------------------------- drain


def test_a_drain_that_runs_out_of_time_answers_json_503() -> None:
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_DRAIN_TIMEOUT_S": "1",
        "SERESNET_REQUEST_TIMEOUT_S": "60",
    }
    with running_service(EMBEDDED_MODEL, env=env) as s:
        with socket.create_connection(addr(s)) as sock:
            sock.sendall(raw_post_head(s, 1000) + b"\0" * 10)  # the body never completes
            time.sleep(0.3)
            s.proc.send_signal(15)
            status, headers, body = read_response(sock, timeout=30)
        assert status == 503
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "shutting_down"
        assert s.proc.wait(30) == 0
        s._stopped = True


# ----------------------------------------------------------------------------- API key


def test_the_api_key_guards_everything_but_health_and_the_page() -> None:
    env = {"SERESNET_WORKERS": "1", "SERESNET_API_KEY": "k3y-for-tests"}
    with running_service(EMBEDDED_MODEL, env=env) as s:
        for path in (
            "/docs",
            "/redoc",
            "/openapi.json",
            "/v2",
            f"/v2/models/{CARD.name}",
            "/metrics",
            "/v2/models",
        ):
            r = httpx.get(f"{s.url}{path}", timeout=10)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        auth = {"Authorization": "Bearer k3y-for-tests"}
        for path in ("/docs", "/openapi.json", "/v2"):
            assert httpx.get(f"{s.url}{path}", headers=auth, timeout=10).status_code == 200
        for path in ("/v2/health/live", "/v2/health/ready", "/"):
            assert httpx.get(f"{s.url}{path}", timeout=10).status_code == 200, path


def test_a_non_ascii_api_key_is_refused_at_start_up() -> None:
    env = {**os.environ, "SERESNET_API_KEY": "clé-secrète"}
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SERESNET_API_KEY" in lines[0] and "ASCII" in lines[0]
    assert "clé" not in proc.stderr  # a secret is never echoed


# ----------------------------------------------------------------------------- 500s


def test_an_unexpected_error_is_logged_but_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    """The service's own handlers and middleware on a route that raises: the caller gets a
    generic message with the request id; the log gets the exception."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.ingress.errors import install_handlers
    from service.ingress.middleware import RequestContext

    app = FastAPI()
    install_handlers(app)
    app.add_middleware(RequestContext)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("password=hunter2 in /etc/secret")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"X-Request-ID": "req-42"})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["code"] == "internal_error"
    assert "hunter2" not in r.text and "RuntimeError" not in r.text
    assert "req-42" in error["message"]
    assert any("hunter2" in str(rec.exc_info) for rec in caplog.records if rec.exc_info)
