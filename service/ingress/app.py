"""``create_app()``: the FastAPI app one ingress worker serves (uvicorn's app factory).

The settings come from the environment, which the supervisor has filled with every flag given
on its command line, plus the engine's socket path.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service import VERSION, logs
from service.ingress import auth
from service.ingress.errors import install_handlers
from service.ingress.lane import ClassifyLane
from service.ingress.middleware import RequestContext
from service.ingress.pipeline import Pipeline
from service.ingress.routes import classify, metrics, v2
from service.ingress.state import IngressState
from service.ingress.v2plane import V2Plane
from service.settings import Settings, load_settings
from service.wire import ENGINE_SOCKET_ENV

GC_THRESHOLD = 20_000  # net allocations between young collections (Python's default: 700)

DESCRIPTION = """\
SE-ResNet image classification: top-k classes over HTTP, with dynamic batching across every
worker process. `POST /classify` takes multipart parts named `images` (or one image as the raw
body). Errors are `{"error": {"code", "message"}}` with the statuses listed per route, but
`{"error": "<string>"}` under `/v2` (the KServe V2 protocol, which Triton's clients read). With
`SERESNET_API_KEY` set, every route but the health checks needs `Authorization: Bearer KEY`.
"""

OPENAPI_TAGS = [
    {"name": "classification", "description": "Images in, top-k classes out."},
    {"name": "health", "description": "Liveness and readiness (KServe V2)."},
    {"name": "model", "description": "Server and model metadata (KServe V2)."},
    {
        "name": "kserve-v2",
        "description": "Inference, model configuration, statistics and "
        "repository index (KServe V2 / Triton); errors "
        'are {"error": "<string>"}.',
    },
    {"name": "metrics", "description": "Prometheus metrics of all processes."},
]


def create_app(settings: Settings | None = None, engine_socket: Path | None = None) -> FastAPI:
    settings = settings or load_settings()
    socket = engine_socket or Path(os.environ[ENGINE_SOCKET_ENV])
    logs.configure(settings.log_level, settings.log_format, process="worker")
    state = IngressState(settings, socket)

    pipeline = Pipeline(state)
    v2plane = V2Plane(state, pipeline)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        grpc = await _start_grpc(state, pipeline, v2plane)
        # What start-up made lives as long as the worker: out of the collector's sight, a full
        # collection scans only what requests leave behind instead of stalling every
        # connection of the worker for tens of ms (bench.peers c=64: p99 137-185 -> 96 ms).
        # A request leaves almost nothing for the collector (refcounts free it), yet the
        # default threshold of 700 net allocations, passed by the objects of the requests in
        # flight, ran a collection every 8 requests: 36 us a request (c=64, 7,000 requests:
        # 995 collections, 250 ms). At 20,000 none ran; cyclic garbage stays bounded by it.
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 10, 10)
        yield
        if grpc is not None:
            # After HTTP's drain, before the engine connection closes: GOAWAY, then the
            # calls already taken are finished.
            await grpc.stop(settings.drain_timeout_s)
        await state.stop()

    app = FastAPI(
        title="seresnet-serve",
        version=VERSION,
        description=DESCRIPTION,
        openapi_tags=OPENAPI_TAGS,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ingress = state
    app.state.pipeline = pipeline
    app.state.v2plane = v2plane
    install_handlers(app)
    for module in (classify, v2, metrics):
        app.include_router(module.router)
    _install_web(app)
    _drop_impossible_422(app)
    app.add_middleware(ClassifyLane, owner=app)  # inside the gate and the request context
    if settings.api_key is not None:
        app.add_middleware(auth.ApiKeyGate, api_key=settings.api_key.get_secret_value())
    app.add_middleware(RequestContext)  # every answer gets a request id
    return app


async def _start_grpc(state: IngressState, pipeline: Pipeline, v2plane: V2Plane) -> Any:
    """The worker's gRPC server on the port the supervisor holds (None: gRPC is off). Imported
    only here, so that a process serving HTTP alone never loads grpc."""
    settings = state.settings
    if not settings.grpc_port:
        return None
    from service.grpc.server import GrpcFrontend

    frontend = GrpcFrontend(state, pipeline, v2plane)
    await frontend.start(settings.host, settings.grpc_port)
    frontend.stop_on_signals(settings.drain_timeout_s)
    return frontend


def _drop_impossible_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with parameters; a route whose parameters are
    only path strings (bodies are read raw, never validated by FastAPI) can never return it,
    so the schema says so."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    params = op.get("parameters", [])
                    if all(
                        p.get("in") == "path" and p.get("schema", {}).get("type") == "string"
                        for p in params
                    ):
                        op.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_web(app: FastAPI) -> None:
    from service import web

    app.include_router(web.router)
    web.install_offline_docs(app)
