"""Decode bombs against a real service: small files whose structure costs Pillow seconds or
gigabytes (progressive scans, RLE rows, TIFF strips, GIF sub-blocks, 16/32-bit and lossless
WebP pixels). Each must be answered in bounded time, leave a bystander on the same worker
served, and keep every service process under 1 GB."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import hostile_files as bombs
import httpx
import pytest
from hostilekit import attack

from testkit.images import noise_png
from testkit.processes import cpu_seconds
from testkit.server import EMBEDDED_MODEL, ServiceProcess, running_service

LIMIT_MB = 1024


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_REQUEST_TIMEOUT_S": "8",
        "SERESNET_MAX_BODY_BYTES": str(32 * 2**20),
        "SERESNET_PREPROCESS_THREADS": "4",
    }
    with running_service(EMBEDDED_MODEL, env=env) as s:
        yield s


def raw(data: bytes) -> Callable[[httpx.Client], httpx.Response]:
    def send(client: httpx.Client) -> httpx.Response:
        return client.post(
            f"{svc_url}/classify",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    return send


svc_url = ""
RAW = {"Content-Type": "application/octet-stream"}


@pytest.fixture(autouse=True)
def _url(svc: ServiceProcess) -> None:
    global svc_url
    svc_url = svc.url


STRUCTURE_BOMBS = {
    "jpeg-progressive-1000-scans": (lambda: bombs.progressive_jpeg_scans(6000, 1000), "scans"),
    "bmp-rle8-end-of-line": (lambda: bombs.bmp_rle8_eol(6000, 6000), "RLE"),
    "tiff-5M-one-row-strips": (lambda: bombs.tiff_strips(5_000_000), "strips"),
    "gif-10M-comment-sub-blocks": (lambda: bombs.gif_comment_blocks(10_000_000), "sub-blocks"),
}


@pytest.mark.parametrize("case", list(STRUCTURE_BOMBS))
def test_structure_bombs_are_refused_from_the_header(svc: ServiceProcess, case: str) -> None:
    make, word = STRUCTURE_BOMBS[case]
    data = make()
    assert len(data) < 32 * 2**20
    out = attack(svc, raw(data), copies=4)
    for r in out.answers:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "corrupt_image"
        assert word in r.json()["error"]["message"]
    assert out.seconds < 10, out
    assert out.bystander_max_s < 3, out
    assert out.worst_rss_mb < LIMIT_MB, out.peak_rss_mb


def test_sixteen_and_thirty_two_bit_pixels_decode_within_the_memory_bound(
    svc: ServiceProcess,
) -> None:
    """6324x6324 at 16 bits (PNG) and 32 bits (TIFF): served, each process under 1 GB (before
    the banded conversion they took 1.1 and 1.3-1.6 GB)."""
    for data in (bombs.png16_gray(6324), bombs.tiff_int32(6324)):
        assert len(data) < 600_000
        out = attack(svc, raw(data), copies=2)
        for r in out.answers:
            assert r.status_code in (200, 504), r.text  # 504: waited its turn past the deadline
        assert any(r.status_code == 200 for r in out.answers)
        assert out.seconds < 30, out
        assert out.bystander_max_s < 10, out
        assert out.worst_rss_mb < LIMIT_MB, out.peak_rss_mb


def test_lossless_webps_that_decode_to_a_gigabyte_are_refused_each(svc: ServiceProcess) -> None:
    webp = bombs.webp_lossless(6300)
    assert len(webp) < 4096

    def send(client: httpx.Client) -> httpx.Response:
        files = [("images", (f"b{i}.webp", webp, "image/webp")) for i in range(4)]
        return client.post(f"{svc_url}/classify", files=files)

    out = attack(svc, send)
    (r,) = out.answers
    assert r.status_code == 200, r.text  # several images: each has its own answer
    for result in r.json()["results"]:
        assert result["error"]["code"] == "image_too_large"
        assert "SERESNET_DECODE_MEMORY_MB" in result["error"]["message"]
    assert out.seconds < 10 and out.bystander_max_s < 3, out
    assert out.worst_rss_mb < LIMIT_MB, out.peak_rss_mb


def test_a_decode_past_its_deadline_stops_with_its_504() -> None:
    """An RLE BMP at the pixel cap (about 0.7 s of decoding) against a 0.3 s deadline: 504 at
    the deadline, and the decode stops with it rather than burning CPU after the answer
    (four at once burned 55 s of CPU after their 504s before). A bystander meanwhile uses the
    other decode thread."""
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_REQUEST_TIMEOUT_S": "0.3",
        "SERESNET_PREPROCESS_THREADS": "2",
    }
    slow = bombs.bmp_rle8_eol(2000, 2000)
    with running_service(EMBEDDED_MODEL, env=env) as s:
        with httpx.Client(timeout=30) as client:
            client.post(f"{s.url}/classify", files=[("images", ("ok.png", noise_png(0)))])
            leftovers = []
            for _ in range(3):
                r = client.post(f"{s.url}/classify", content=slow, headers=RAW)
                assert r.status_code == 504, r.text
                assert r.json()["error"]["code"] == "deadline_exceeded"
                before = cpu_seconds(s.proc.pid)
                time.sleep(1.5)
                leftovers.append(cpu_seconds(s.proc.pid) - before)
        assert min(leftovers) < 0.15, f"CPU seconds used after each 504: {leftovers}"
