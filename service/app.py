"""The HTTP service (DESIGN.md §5): ``create_app(settings)`` builds the FastAPI app.

Request path of ``POST /classify``: API key -> ready? -> body read under limits (bodies.py)
-> admission against the queue bound -> decode + preprocess each image in a thread pool
(imaging.py) -> the batcher (batcher.py) runs the model in its own thread -> softmax/top-k ->
JSON. A watcher notices a caller that hangs up and withdraws its images before they cost a
model run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import imaging, logs
from service.batcher import (
    Batcher,
    BatcherClosedError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
)
from service.bodies import IMAGE_FIELD, BodyError, read_uploads
from service.engine import Engine, softmax, top_k
from service.errors import ServiceError
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.settings import Settings

log = logging.getLogger("service.app")
access_log = logging.getLogger("service.access")

VERSION = "0.1.0"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_QUIET_PATHS = ("/v2/health/", "/metrics")
# Up to this many images of up to this many pixels are decoded on the event loop: measured
# here, a 28x28 PNG decodes in 0.07 ms and a 224x224 JPEG (DCT-downscaled) in 0.2 ms, less than a
# round trip through the decode pool.
INLINE_MAX_IMAGES = 2
INLINE_MAX_PIXELS = 256 * 256


# --------------------------------------------------------------------------- errors


class ApiError(ServiceError):
    """Ends the request with its error response."""


class ClientGoneError(Exception):
    """The caller disconnected while its images waited."""


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
                 405: "method_not_allowed", 413: "body_too_large",
                 415: "unsupported_media_type", 422: "invalid_parameter"}


# --------------------------------------------------------------------------- response schema


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float = Field(description="softmax probability")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. corrupt_image")
    message: str


class ImageResult(BaseModel):
    filename: str
    predictions: list[Prediction] | None = Field(None, description="descending by score")
    error: ErrorDetail | None = Field(None, description="set instead of predictions")


class ClassifyResponse(BaseModel):
    model: str
    model_version: str
    results: list[ImageResult] = Field(description="one per image, in request order")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --------------------------------------------------------------------------- service state


class ServiceState:
    """Engine, batcher, pools and readiness of one app."""

    def __init__(self, settings: Settings, engine: Engine | None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics: Metrics | None = None
        self.batcher: Batcher | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.warm = False
        self.draining = False
        self.fatal: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.decoding = 0
        self._warmup: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return (self.warm and not self.draining and self.fatal is None
                and self.batcher is not None and self.batcher.running)

    async def start(self) -> None:
        s = self.settings
        imaging.disable_pillow_bomb_check()
        if self.engine is None:
            self.engine = await asyncio.to_thread(Engine.load, s)
        engine = self.engine
        info = engine.info
        self.metrics = Metrics(
            {"model": engine.card.name, "version": engine.card.version,
             "provider": info.provider, "graph": info.graph, "opt_level": info.opt_level},
            s.max_batch_size, info.reason)
        self.metrics.ready.set(0)
        self.pool = ThreadPoolExecutor(s.preprocess_workers(), thread_name_prefix="preprocess")
        self.batcher = Batcher(
            lambda images: softmax(engine.run(images)),
            max_batch_size=s.max_batch_size, max_queue_delay_s=s.max_queue_delay_ms / 1000,
            max_queue_size=s.max_queue_size, observer=self.metrics)
        self.batcher.start()
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        assert self.engine is not None and self.metrics is not None
        try:
            await asyncio.to_thread(self.engine.warm_up, self.settings.warmup_rounds)
        except Exception as e:  # a model that cannot run must not report ready
            self.fatal = f"warm-up failed: {type(e).__name__}: {e}"
            log.exception("warm-up failed; the service will not become ready")
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
            return
        self.warm = True
        self.metrics.ready.set(1)
        log.info("ready", extra={"model": self.engine.card.name})

    def begin_drain(self) -> None:
        """Shutdown has begun: report not ready, and stop holding images for fuller batches
        (what is queued runs now). Requests already accepted are still answered."""
        self.draining = True
        if self.metrics is not None:
            self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.flush()
        log.info("draining", extra={"queued": self.batcher.depth if self.batcher else 0,
                                    "decoding": self.decoding})

    async def stop(self) -> None:
        """Lifespan shutdown: uvicorn has already let in-flight requests finish; run anything
        still queued, then stop the threads."""
        self.draining = True
        if self.metrics is not None:
            self.metrics.ready.set(0)
        if self._warmup is not None and not self._warmup.done():
            with contextlib.suppress(Exception):
                await self._warmup
        if self.batcher is not None:
            depth = self.batcher.depth
            await self.batcher.close(self.settings.drain_timeout_s)
            log.info("drained", extra={"queued_at_shutdown": depth,
                                       "batches": self.batcher.stats.batches,
                                       "images_run": self.batcher.stats.images_run})
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    # ----------------------------------------------------------------- per request

    def check_ready(self) -> None:
        if self.fatal:
            raise ApiError(503, "not_ready", self.fatal, {"Retry-After": "60"})
        if not self.ready:
            why = "shutting down" if self.draining else "warming up"
            raise ApiError(503, "not_ready", f"the service is {why}", {"Retry-After": "1"})

    @contextlib.contextmanager
    def admitted(self, n: int) -> Any:
        """Count images being decoded against the same bound as the queue, so a burst of big
        images is refused (503) instead of piling up in the decode pool."""
        assert self.batcher is not None and self.metrics is not None
        if self.decoding + self.batcher.depth + n > self.settings.max_queue_size:
            self.metrics.on_dropped("queue_full", n)
            raise ApiError(503, "queue_full",
                           f"{self.decoding + self.batcher.depth} images in progress; {n} more "
                           f"exceed SERESNET_MAX_QUEUE_SIZE={self.settings.max_queue_size}",
                           {"Retry-After": str(self.batcher.retry_after_s())})
        self.decoding += n
        self.metrics.preprocess_backlog.set(self.decoding)
        try:
            yield
        finally:
            self.decoding -= n
            self.metrics.preprocess_backlog.set(self.decoding)

    def _finish(self, image: Image.Image) -> tuple[np.ndarray | imaging.ImageError, float]:
        assert self.engine is not None
        t0 = time.perf_counter()
        try:
            out: np.ndarray | imaging.ImageError = imaging.finish(image, self.engine.card.input)
        except imaging.ImageError as e:
            out = e
        return out, time.perf_counter() - t0

    async def decode_all(self, blobs: list[bytes]) -> list[np.ndarray | imaging.ImageError]:
        """Headers are read (and limits checked) on the loop; pixels are decoded in the pool,
        except for a request's few small images, which cost less to decode than the hand-off
        to a thread and back."""
        assert self.metrics is not None
        loop = asyncio.get_running_loop()
        out: list[np.ndarray | imaging.ImageError] = []
        pending: dict[int, asyncio.Future[tuple[np.ndarray | imaging.ImageError, float]]] = {}
        inline = len(blobs) <= INLINE_MAX_IMAGES
        for i, data in enumerate(blobs):
            try:
                image = imaging.open_checked(data, self.settings.max_image_pixels)
            except imaging.ImageError as e:
                out.append(e)
                continue
            if inline and image.width * image.height <= INLINE_MAX_PIXELS:
                result, seconds = self._finish(image)
                self.metrics.preprocess_duration.observe(seconds)
                out.append(result)
            else:
                out.append(imaging.ImageError(500, "internal_error", "not decoded"))
                pending[i] = loop.run_in_executor(self.pool, self._finish, image)
        if pending:
            done = await asyncio.gather(*pending.values())
            for i, (result, seconds) in zip(pending, done, strict=True):
                self.metrics.preprocess_duration.observe(seconds)
                out[i] = result
        return out

    async def infer(self, images: list[np.ndarray], deadline: float,
                    receive: Receive) -> np.ndarray:
        """Probabilities [n, classes]; withdraws the images if the caller hangs up."""
        assert self.batcher is not None
        submit = asyncio.ensure_future(self.batcher.submit(images, deadline))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not submit.done():
                submit.cancel()
            gone.cancel()
        if not submit.done() or submit.cancelled():
            raise ClientGoneError
        try:
            return submit.result()
        except QueueFullError as e:
            raise ApiError(503, "queue_full", str(e),
                           {"Retry-After": str(e.retry_after_s)}) from None
        except DeadlineExceededError as e:
            raise ApiError(504, "deadline_exceeded", str(e)) from None
        except BatcherClosedError as e:
            raise ApiError(503, "shutting_down", str(e), {"Retry-After": "1"}) from None
        except BatchFailedError as e:
            raise ApiError(500, "inference_failed", str(e)) from None


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the client hangs up. Only called after the body is read, when the next
    ASGI message can only be the disconnect."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- middleware


class RequestContext:
    """Pure ASGI middleware: request id (``X-Request-ID`` in and out), one access-log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        status = 0
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            state = scope.get("state") or {}
            fields = {"method": scope.get("method"), "path": path, "status": status,
                      "duration_ms": round((time.perf_counter() - t0) * 1000, 2)}
            if "images" in state:
                fields["images"] = state["images"]
            if "error_code" in state:
                fields["code"] = state["error_code"]
            quiet = path.startswith(_QUIET_PATHS) and status < 400
            access_log.log(logging.DEBUG if quiet else logging.INFO, "request", extra=fields)
            logs.request_id.reset(token)


# --------------------------------------------------------------------------- app


_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": [IMAGE_FIELD],
                "properties": {IMAGE_FIELD: {"type": "array",
                                             "items": {"type": "string", "format": "binary"}}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "no image, or a single image that is empty or corrupt",
        401: "missing or wrong API key",
        413: "body, image or image count over the limits",
        415: "unsupported content type or image format",
        422: "invalid parameter",
        503: "queue full or not ready (see Retry-After)",
        504: "deadline exceeded",
    }.items()
}


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The service for ``settings``. Pass a loaded ``engine`` to skip loading in the lifespan
    (``python -m service`` loads it first, to fail fast with a clear message)."""
    state = ServiceState(settings, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        yield
        await state.stop()

    app = FastAPI(
        title="seresnet-serve",
        version=VERSION,
        summary="SE-ResNet image classification: top-k over HTTP with dynamic batching",
        lifespan=lifespan,
    )
    app.state.service = state
    app.add_middleware(RequestContext)
    api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key):
            raise ApiError(401, "unauthorized",
                           "send the API key as 'Authorization: Bearer KEY'",
                           {"WWW-Authenticate": "Bearer"})

    protected = [Depends(authorize)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        request.state.error_code = exc.code
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
        request.state.error_code = "invalid_parameter"
        return error_response(422, "invalid_parameter", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail),
                              dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.post(
        "/classify", response_model=ClassifyResponse, dependencies=protected,
        responses=_ERRORS, openapi_extra=_CLASSIFY_BODY,
        summary="Classify one or more images (multipart parts named 'images', or a raw body)",
    )
    async def classify(
        request: Request,
        top_k_: int = Query(5, alias="top_k", ge=1,
                            description="predictions per image (clamped to the class count)"),
    ) -> Response:
        t0 = time.perf_counter()
        deadline = time.monotonic() + settings.request_timeout_s
        metrics = state.metrics
        try:
            response = await _classify(request, top_k_, deadline)
        except ApiError as e:
            if metrics is not None:
                metrics.request_failure(e.code)
            raise
        except ClientGoneError:
            if metrics is not None:
                metrics.request_failure("client_gone")
            request.state.error_code = "client_gone"
            return Response(status_code=499)
        finally:
            if metrics is not None:
                metrics.request_duration.observe(time.perf_counter() - t0)
        assert metrics is not None
        metrics.request_success.inc()
        return response

    async def _classify(request: Request, k: int, deadline: float) -> Response:
        state.check_ready()
        assert state.engine is not None and state.metrics is not None
        card = state.engine.card
        try:
            uploads = await read_uploads(request.headers, request.stream(),
                                         settings.max_body_bytes,
                                         settings.max_images_per_request)
        except BodyError as e:
            raise ApiError(e.status, e.code, e.message) from None
        request.state.images = len(uploads)
        with state.admitted(len(uploads)):
            try:
                decoded = await asyncio.wait_for(
                    state.decode_all([u.data for u in uploads]), deadline - time.monotonic())
            except TimeoutError:
                raise ApiError(504, "deadline_exceeded",
                               "deadline passed while decoding the images") from None
        good = [a for a in decoded if isinstance(a, np.ndarray)]
        if len(uploads) == 1 and not good:
            err = decoded[0]
            assert isinstance(err, imaging.ImageError)
            raise ApiError(err.status, err.code, f"{uploads[0].filename}: {err.message}")
        probs = await state.infer(good, deadline, request.receive) if good else None
        results: list[dict[str, Any]] = []
        row = 0
        for upload, item in zip(uploads, decoded, strict=True):
            if isinstance(item, imaging.ImageError):
                state.metrics.image_failure(item.code)
                results.append({"filename": upload.filename,
                                "error": {"code": item.code, "message": item.message}})
                continue
            assert probs is not None
            results.append({"filename": upload.filename, "predictions": [
                {"label": card.labels[c], "class_id": c, "score": p}
                for c, p in top_k(probs[row], k)]})
            row += 1
        return JSONResponse({"model": card.name, "model_version": card.version,
                             "results": results})

    @app.get("/v2/health/live", summary="Liveness (KServe V2)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: 200 only after warm-up (KServe V2)",
             responses={503: {"model": ErrorResponse}})
    async def ready() -> dict[str, bool]:
        state.check_ready()
        return {"ready": True}

    @app.get("/v2", summary="Server metadata (KServe V2)")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "seresnet-serve", "version": VERSION, "extensions": []}

    def _model_or_404(name: str) -> Engine:
        engine = state.engine
        if engine is None or name != engine.card.name:
            known = engine.card.name if engine else "none loaded"
            raise ApiError(404, "model_not_found", f"no model {name!r} (served: {known})")
        return engine

    @app.get("/v2/models/{name}", dependencies=protected,
             summary="Model metadata (KServe V2) plus the card and how it is run")
    async def model_metadata(name: str) -> dict[str, Any]:
        engine = _model_or_404(name)
        card, spec = engine.card, engine.card.input
        return {
            "name": card.name,
            "versions": [card.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": spec.tensor, "datatype": "UINT8" if spec.dtype == "uint8"
                        else "FP32", "shape": [-1, spec.channels, spec.height, spec.width]}],
            "outputs": [{"name": card.output.logits, "datatype": "FP32",
                         "shape": [-1, card.num_classes]}],
            "ready": state.ready,
            "engine": engine.info.describe(),
            "batching": {"max_batch_size": settings.max_batch_size,
                         "max_queue_delay_ms": settings.max_queue_delay_ms,
                         "max_queue_size": settings.max_queue_size,
                         "preprocess_threads": settings.preprocess_workers()},
            "limits": {"max_body_bytes": settings.max_body_bytes,
                       "max_image_pixels": settings.max_image_pixels,
                       "max_images_per_request": settings.max_images_per_request,
                       "request_timeout_s": settings.request_timeout_s},
            "card": card.model_dump(mode="json"),
        }

    @app.get("/v2/models/{name}/ready", dependencies=protected, summary="Model readiness")
    async def model_ready(name: str) -> dict[str, Any]:
        _model_or_404(name)
        state.check_ready()
        return {"name": name, "ready": True}

    @app.get("/metrics", dependencies=protected, summary="Prometheus metrics")
    async def metrics() -> Response:
        body = state.metrics.exposition() if state.metrics else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app

