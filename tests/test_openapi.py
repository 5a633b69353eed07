"""The OpenAPI page tells the truth about error bodies: a real service's ``/openapi.json``
documents ``{"error": "<string>"}`` on every ``/v2`` route and ``{"error": {"code",
"message"}}`` elsewhere, and real error answers of a real service have the documented status
and shape (the API key gate's answers included)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from imagesamples import TEXT
from serverutil import EMBEDDED_MODEL, ServiceProcess, running_service

from modelcard.schema import read_card
from service.errors import CODES

CARD = read_card(EMBEDDED_MODEL)
KEY = "openapi-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
V2_ERROR = "#/components/schemas/V2ErrorResponse"
ERROR = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    with running_service(None, env={"SERESNET_API_KEY": KEY, "SERESNET_WORKERS": "1"}) as s:
        yield s


@pytest.fixture(scope="module")
def spec(svc: ServiceProcess) -> dict[str, Any]:
    r = httpx.get(f"{svc.url}/openapi.json", headers=AUTH, timeout=30)
    r.raise_for_status()
    return r.json()


def _error_refs(operation: dict[str, Any]) -> dict[int, str]:
    out = {}
    for status, response in operation["responses"].items():
        if int(status) >= 400:
            schema = response["content"]["application/json"]["schema"]
            out[int(status)] = schema["$ref"]
    return out


def test_every_route_documents_the_error_shape_of_its_path(spec: dict[str, Any]) -> None:
    v2_routes = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            expected = V2_ERROR if path == "/v2" or path.startswith("/v2/") else ERROR
            for status, ref in _error_refs(op).items():
                assert ref == expected, f"{method.upper()} {path} {status}: {ref}"
            v2_routes += path.startswith("/v2/")
    assert v2_routes >= 15
    v2_schema = spec["components"]["schemas"]["V2ErrorResponse"]
    assert v2_schema["properties"]["error"]["type"] == "string"


def test_versioned_routes_are_documented_with_their_version(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    for suffix in ("", "/ready", "/config", "/stats", "/infer"):
        plain = paths[f"/v2/models/{{name}}{suffix}"]
        versioned = paths[f"/v2/models/{{name}}/versions/{{version}}{suffix}"]
        assert plain.keys() == versioned.keys()
        for method, op in versioned.items():
            names = [p["name"] for p in op["parameters"] if p["in"] == "path"]
            assert sorted(names) == ["name", "version"], (suffix, names)
            assert plain[method]["responses"].keys() == op["responses"].keys()


def test_each_documented_status_lists_its_codes(spec: dict[str, Any]) -> None:
    classify = spec["paths"]["/classify"]["post"]["responses"]
    for status, response in classify.items():
        if int(status) < 400:
            continue
        named = [
            c
            for c, e in CODES.items()
            if f"{c})" in response["description"] or f"{c}," in response["description"]
        ]
        assert named and all(CODES[c].status == int(status) for c in named), (status, named)


def _check(spec: dict[str, Any], template: str, method: str, response: httpx.Response) -> None:
    op = spec["paths"][template][method]
    documented = _error_refs(op)
    assert response.status_code in documented, (template, response.status_code, response.text)
    body = response.json()
    if documented[response.status_code] == V2_ERROR:
        assert isinstance(body["error"], str) and body["error"], body
    else:
        assert set(body["error"]) == {"code", "message"}, body
        assert CODES[body["error"]["code"]].status == response.status_code


def test_real_error_answers_have_the_documented_status_and_shape(
    svc: ServiceProcess, spec: dict[str, Any]
) -> None:
    url, name = svc.url, CARD.name
    with httpx.Client(base_url=url, timeout=30) as c:
        # The API key gate answers before any route, in the shape of the path.
        _check(spec, "/v2/models/{name}", "get", c.get(f"/v2/models/{name}"))
        _check(spec, "/classify", "post", c.post("/classify", content=b"x"))
        _check(spec, "/v2/models/{name}", "get", c.get("/v2/models/nope", headers=AUTH))
        _check(
            spec,
            "/v2/models/{name}/versions/{version}/config",
            "get",
            c.get(f"/v2/models/{name}/versions/999/config", headers=AUTH),
        )
        _check(
            spec,
            "/v2/models/{name}/infer",
            "post",
            c.post(f"/v2/models/{name}/infer", content=b"{not json", headers=AUTH),
        )
        _check(
            spec,
            "/v2/repository/index",
            "post",
            c.post("/v2/repository/index", content=b"[1]", headers=AUTH),
        )
        _check(
            spec,
            "/classify",
            "post",
            c.post("/classify", content=TEXT, headers={**AUTH, "Content-Type": "image/png"}),
        )
        _check(spec, "/classify", "post", c.post("/classify?top_k=0", content=b"", headers=AUTH))
