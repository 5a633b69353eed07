"""KServe V2 parse bombs against a real service: JSON of millions of tiny lists or numbers,
the same gzip-compressed to kilobytes, BYTES tensors of millions of empty elements, and a
timeout past any integer type. Each is refused with 400 in bounded time, a bystander on the
same worker keeps being served, and no process grows past its bound."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Callable, Iterator

import httpx
import pytest
from hostilekit import attack

from modelcard.schema import read_card
from testkit.server import EMBEDDED_MODEL, ServiceProcess, running_service

CARD = read_card(EMBEDDED_MODEL)
LIMIT_MB = 1024


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    env = {"SERESNET_WORKERS": "1", "SERESNET_MAX_BODY_BYTES": str(32 * 2**20)}
    with running_service(EMBEDDED_MODEL, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def input_name(svc: ServiceProcess) -> str:
    meta = httpx.get(f"{svc.url}/v2/models/{CARD.name}", timeout=10).json()
    return str(meta["inputs"][0]["name"])


def infer(svc: ServiceProcess, body: bytes, headers: dict[str, str] | None = None) -> Callable:  # type: ignore[type-arg]
    def send(client: httpx.Client) -> httpx.Response:
        return client.post(
            f"{svc.url}/v2/models/{CARD.name}/infer",
            content=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    return send


def lists_body(name: str, count: int) -> bytes:
    head = json.dumps({"inputs": [{"name": name, "shape": [1], "datatype": "UINT8", "data": 0}]})
    return head.replace('"data": 0', '"data": [' + ",".join(["[0]"] * count) + "]").encode()


def numbers_body(name: str, count: int) -> bytes:
    head = json.dumps({"inputs": [{"name": name, "shape": [1], "datatype": "UINT8", "data": 0}]})
    return head.replace('"data": 0', '"data": [' + ",".join(["0"] * count) + "]").encode()


def empty_strings_body(name: str, count: int) -> bytes:
    head = json.dumps({"inputs": [{"name": name, "shape": [1], "datatype": "BYTES", "data": 0}]})
    return head.replace('"data": 0', '"data": [' + ",".join(['""'] * count) + "]").encode()


def assert_refused(out, word: str, copies: int = 1) -> None:  # type: ignore[no-untyped-def]
    assert len(out.answers) == copies
    for r in out.answers:
        assert r.status_code == 400, r.text
        assert word in r.json()["error"], r.text
    assert out.seconds < 10, out
    assert out.bystander_max_s < 2, out
    assert out.worst_rss_mb < LIMIT_MB, out.peak_rss_mb


def test_eight_million_one_element_lists_are_refused_before_parsing(
    svc: ServiceProcess, input_name: str
) -> None:
    body = lists_body(input_name, 8_000_000)
    assert 30 * 2**20 < len(body) < 32 * 2**20
    assert_refused(attack(svc, infer(svc, body)), "values")


def test_the_same_gzip_compressed_four_at_once(svc: ServiceProcess, input_name: str) -> None:
    body = gzip.compress(lists_body(input_name, 8_000_000))
    assert len(body) < 64 * 1024
    out = attack(svc, infer(svc, body, {"Content-Encoding": "gzip"}), copies=4)
    assert_refused(out, "values", copies=4)


def test_fifteen_million_numbers_are_refused_before_parsing(
    svc: ServiceProcess, input_name: str
) -> None:
    body = numbers_body(input_name, 15_000_000)
    assert len(body) < 32 * 2**20
    assert_refused(attack(svc, infer(svc, body)), "values")


def test_eight_million_empty_json_strings_are_refused(svc: ServiceProcess, input_name: str) -> None:
    body = empty_strings_body(input_name, 8_000_000)
    assert len(body) < 32 * 2**20
    assert_refused(attack(svc, infer(svc, body)), "values")


def test_eight_million_empty_binary_elements_are_refused_as_read(
    svc: ServiceProcess, input_name: str
) -> None:
    blob = struct.pack("<I", 0) * 8_000_000
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    send = infer(
        svc,
        header + blob,
        {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert_refused(attack(svc, send), "element")


def test_a_timeout_past_any_integer_is_400(svc: ServiceProcess, input_name: str) -> None:
    body = json.dumps(
        {
            "parameters": {"timeout": 10**400},
            "inputs": [{"name": input_name, "shape": [1], "datatype": "BYTES", "data": ["x"]}],
        }
    ).encode()
    r = infer(svc, body)(httpx.Client(timeout=30))
    assert r.status_code == 400, r.text
    assert "timeout" in r.json()["error"]
