"""service.ingress.lane: ``POST /classify`` skips Starlette's router and FastAPI's request
handler, yet answers every request exactly as the route itself does. The same app is asked
the same requests with the lane and without it (FastAPI's own path); a real service then
classifies through the lane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from imagesamples import TEXT, encode, photo
from serverutil import running_service

from service.ingress.app import create_app
from service.ingress.lane import ClassifyLane
from service.settings import load_settings

KEY = "lane-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JPEG = encode(photo(64, 64), "JPEG")


def _app(lane: bool) -> FastAPI:
    settings = load_settings({"api_key": KEY})
    app = create_app(settings, engine_socket=Path("/nonexistent/engine.sock"))
    if not lane:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not ClassifyLane]
    return app


# No engine runs here, so these end before one would: the parameter's refusals, the key
# gate, readiness (a service error through the app's handler) and a path that is not the
# lane's. The body's refusals through the lane are a real service's in test_openapi.py and
# test_service_http.py.
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/classify", {"content": JPEG, "headers": {**AUTH, "Content-Type": "image/jpeg"}}),
    ("/classify?top_k=0", {"content": JPEG, "headers": {**AUTH, "Content-Type": "image/jpeg"}}),
    ("/classify?top_k=abc", {"content": JPEG, "headers": AUTH}),
    ("/classify?top_k=1&top_k=-2", {"content": JPEG, "headers": AUTH}),
    ("/classify", {"content": JPEG, "headers": {"Content-Type": "image/jpeg"}}),  # no key
    ("/classify", {"content": TEXT, "headers": {**AUTH, "Content-Type": "text/plain"}}),
    ("/classify/", {"content": JPEG, "headers": AUTH}),  # not the lane's path
]


def _answer(client: TestClient, path: str, kw: dict[str, Any]) -> tuple[int, str, bytes]:
    r = client.post(path, follow_redirects=False, **kw)
    return r.status_code, r.headers.get("content-type", ""), r.content


def test_the_lane_answers_as_the_route_does() -> None:
    with TestClient(_app(lane=False)) as plain, TestClient(_app(lane=True)) as lane:
        for path, kw in REQUESTS:
            want = _answer(plain, path, kw)
            got = _answer(lane, path, kw)
            assert got == want, path
        # Other methods are FastAPI's: a 405 with its Allow header.
        r = lane.get("/classify", headers=AUTH)
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_post_classify_never_reaches_the_router(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app(lane=True)
    routed: list[str] = []
    router_call = type(app.router).__call__

    async def counting(self: Any, scope: Any, receive: Any, send: Any) -> None:
        routed.append(scope.get("path", ""))
        await router_call(self, scope, receive, send)

    monkeypatch.setattr(type(app.router), "__call__", counting)
    with TestClient(app) as client:
        routed.clear()  # the lifespan's own call
        client.post("/classify?top_k=0", content=JPEG, headers=AUTH)
        assert routed == []
        client.get("/v2/health/live")
        assert routed == ["/v2/health/live"]


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    with running_service(None, env={"SERESNET_WORKERS": "1"}) as svc:
        yield svc.url


def test_a_real_service_classifies_through_the_lane(served: str) -> None:
    r = httpx.post(
        f"{served}/classify?top_k=3",
        content=JPEG,
        headers={"Content-Type": "image/jpeg", "X-Request-ID": "lane-1"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "lane-1"
    (result,) = r.json()["results"]
    assert len(result["predictions"]) == 3
    scores = [p["score"] for p in result["predictions"]]
    assert scores == sorted(scores, reverse=True)
