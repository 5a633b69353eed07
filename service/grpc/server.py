"""The gRPC adapter of a worker's request pipeline: ``inference.GRPCInferenceService`` on
``grpc.aio`` in the worker's own event loop, beside its HTTP.

Every method goes through what ``/v2`` over HTTP goes through: the API key (``authorization:
Bearer KEY`` metadata; ServerLive and ServerReady are open, as the HTTP health checks are), the
same V2 codec (:func:`~service.v2.request.build_infer_request`), the same
:class:`~service.ingress.pipeline.Pipeline` (admission, the batcher, per-image errors, request
metrics), the worker's in-flight byte budget, and the request deadline, shortened by the
client's gRPC deadline. A message larger than ``SERESNET_MAX_BODY_BYTES`` is refused by gRPC
itself (RESOURCE_EXHAUSTED). Errors are the service's codes, each sent as the gRPC status
:data:`service.errors.GRPC_STATUS` gives it, with the code in the ``seresnet-error-code``
trailer; those the client may retry carry ``retry-after`` and a ``google.rpc.RetryInfo``.

Every worker serves the one port with ``SO_REUSEPORT`` (the supervisor holds it for them:
:mod:`service.grpc.port`); on shutdown the server stops taking RPCs (GOAWAY) and finishes
those it took, within ``SERESNET_DRAIN_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from prometheus_client import Counter

from service import logs
from service.errors import HIDDEN_CAUSE, ServiceError, grpc_status_of
from service.grpc import protocol
from service.grpc.port import target
from service.ingress.budget import BudgetExceededError
from service.ingress.errors import ClientGoneError, internal_error_message
from service.ingress.pipeline import Held, Pipeline, bytes_busy
from service.ingress.state import IngressState
from service.ingress.v2plane import V2Plane
from service.v2 import metadata as v2meta
from service.v2.errors import BinaryDataError, InvalidRequest, SchemaError
from service.v2.request import InferRequest, RequestBody, build_infer_request
from service.v2.response import infer_outputs
from service.v2.signature import Signature

access_log = logging.getLogger("service.access")
log = logging.getLogger("service.ingress")

ERROR_CODE_TRAILER = "seresnet-error-code"
_RETRY_INFO_URL = "type.googleapis.com/google.rpc.RetryInfo"
_OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # as the HTTP health checks
_QUIET_METHODS = _OPEN_METHODS  # polled: logged at debug level when they succeed

# The typed contents field of each datatype (Triton's; FP16 and BF16 have none).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_requests: Counter | None = None


def _request_counter() -> Counter:
    # One per process, made on first use (multiprocess mode: two would overwrite each other).
    global _requests
    if _requests is None:
        _requests = Counter(
            "seresnet_grpc_requests",
            "gRPC calls answered, by method and gRPC status",
            ["method", "status"],
            registry=None,
        )
    return _requests


# ----------------------------------------------------------------------------- the codec


def _parameters(params: Any) -> dict[str, Any]:
    """A protobuf map of InferParameter as the JSON protocol's parameters object."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(value, which)
    return out


def decode_infer(message: Any, signature: Signature, max_batch_size: int) -> InferRequest:
    """A ModelInferRequest validated by the V2 codec, as HTTP's JSON and binary bodies are:
    ``raw_input_contents`` are the binary data, typed ``contents`` the JSON ``data``."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise BinaryDataError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} input(s); "
            "send one per input, or typed contents for all"
        )
    # The most values a typed input may hold: a full batch. Checked before the values become
    # Python objects (a message of one-byte varints would otherwise be millions of them).
    most = max_batch_size * math.prod(signature.image_shape)
    inputs: list[dict[str, Any]] = []
    blobs: list[memoryview | None] = []
    for i, tensor in enumerate(message.inputs):
        data: list[Any] | None = None
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(
                    f"input {tensor.name!r} has both typed contents and raw_input_contents"
                )
            blobs.append(memoryview(raw[i]))
        else:
            blobs.append(None)
            field = _CONTENTS.get(tensor.datatype)
            if field is not None and tensor.HasField("contents"):
                values = getattr(tensor.contents, field)
                if len(values) > most:
                    raise SchemaError(
                        f"input {tensor.name!r} holds {len(values)} values; a batch of at "
                        f"most {max_batch_size} images needs at most {most}"
                    )
                data = list(values)
        inputs.append(
            {
                "name": tensor.name,
                "shape": list(tensor.shape),
                "datatype": tensor.datatype,
                "parameters": _parameters(tensor.parameters),
                "data": data,
            }
        )
    body = RequestBody.model_validate(
        {
            "id": message.id or None,
            "parameters": _parameters(message.parameters),
            "inputs": inputs,
            "outputs": [
                {"name": out.name, "parameters": _parameters(out.parameters)}
                for out in message.outputs
            ]
            or None,
        }
    )
    return build_infer_request(body, blobs, signature, max_batch_size)


def _status_details(code: grpc.StatusCode, message: str, retry_after_s: int | None) -> bytes:
    """google.rpc.Status with a RetryInfo, the rich error model's trailer."""
    status = protocol.message("google.rpc.Status")(code=code.value[0], message=message)
    if retry_after_s is not None:
        info = protocol.message("google.rpc.RetryInfo")()
        info.retry_delay.seconds = retry_after_s
        status.details.add(type_url=_RETRY_INFO_URL, value=info.SerializeToString())
    return bytes(status.SerializeToString())


# ----------------------------------------------------------------------------- the service


class GrpcFrontend:
    """The gRPC server of one worker."""

    def __init__(self, state: IngressState, pipeline: Pipeline, v2: V2Plane) -> None:
        self.state = state
        self.pipeline = pipeline
        self.v2 = v2
        settings = state.settings
        key = settings.api_key
        self._expected = None if key is None else b"bearer " + key.get_secret_value().encode()
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Future[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (shared with the other workers); the port bound."""
        settings = self.state.settings
        server = grpc.aio.server(
            # gRPC reads a whole message before a handler sees it: a bound on the calls in
            # progress bounds that memory (beyond it gRPC itself answers RESOURCE_EXHAUSTED),
            # as SERESNET_MAX_CONNECTIONS bounds HTTP's connections.
            maximum_concurrent_rpcs=settings.max_connections,
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
            ],
        )
        handlers = {}
        for name, (request_cls, response_cls) in protocol.methods().items():
            implementation = getattr(self, f"_{name}", None)
            if implementation is None:
                continue
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._wrap(name, implementation),
                request_deserializer=request_cls.FromString,
                response_serializer=response_cls.SerializeToString,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(protocol.SERVICE, handlers),)
        )
        self.port = server.add_insecure_port(target(host, port))
        if not self.port:
            raise OSError(f"cannot bind the gRPC port {target(host, port)}")
        await server.start()
        self._server = server
        return self.port

    def begin_stop(self, grace_s: float) -> None:
        """Stop taking RPCs now (GOAWAY); the ones taken go on for at most ``grace_s``."""
        if self._stopping is None and self._server is not None:
            self._stopping = asyncio.ensure_future(self._server.stop(grace_s))

    async def stop(self, grace_s: float) -> None:
        """:meth:`begin_stop`, and wait until the calls taken have finished."""
        self.begin_stop(grace_s)
        if self._stopping is not None:
            await self._stopping

    def stop_on_signals(self, grace_s: float) -> None:
        """Begin the stop at the worker's SIGTERM/SIGINT, before its HTTP drain (the worker
        runs :meth:`stop` only after that), chained in front of uvicorn's own handlers."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin_stop, grace_s)
                if callable(previous):
                    previous(signum, frame)

            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (an app run in a test's thread)
                return

    # ----------------------------------------------------------------- every call

    def _wrap(
        self,
        method: str,
        implementation: Callable[[Any, grpc.aio.ServicerContext, dict[str, Any]], Awaitable[Any]],
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        path = f"/{protocol.SERVICE}/{method}"

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = {
                k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
            }
            given = metadata.get("x-request-id", "")
            rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
            token = logs.request_id.set(rid)
            t0 = time.perf_counter()
            fields: dict[str, Any] = {}
            status = grpc.StatusCode.OK
            error: ServiceError | None = None
            try:
                try:
                    if method not in _OPEN_METHODS:
                        self._check_key(metadata)
                    return await implementation(request, context, fields)
                except ServiceError as e:
                    error = e
                except ClientGoneError:
                    status = grpc.StatusCode.CANCELLED
                    fields["code"] = "client_gone"
                    raise asyncio.CancelledError from None
                except asyncio.CancelledError:
                    status = grpc.StatusCode.CANCELLED
                    fields["code"] = "client_gone"
                    raise
                except Exception as exc:
                    log.error("unhandled error", exc_info=exc)
                    error = ServiceError.of("internal_error", internal_error_message())
                status = grpc.StatusCode[grpc_status_of(error.code)]
                fields["code"] = error.code
                await self._abort(context, status, error)  # raises: the call ends here
                return None
            finally:
                _request_counter().labels(method, status.name).inc()
                fields = {
                    "protocol": "grpc",
                    "path": path,
                    "grpc_status": status.name,
                    "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                    **fields,
                }
                quiet = method in _QUIET_METHODS and status == grpc.StatusCode.OK
                access_log.log(logging.DEBUG if quiet else logging.INFO, "request", extra=fields)
                logs.request_id.reset(token)

        return handler

    def _check_key(self, metadata: dict[str, str]) -> None:
        if self._expected is None:
            return
        scheme, _, key = metadata.get("authorization", "").encode().partition(b" ")
        if not hmac.compare_digest(scheme.lower() + b" " + key.strip(), self._expected):
            raise ServiceError.of(
                "unauthorized", "send the API key as 'authorization: Bearer KEY' metadata"
            )

    async def _abort(
        self, context: grpc.aio.ServicerContext, status: grpc.StatusCode, error: ServiceError
    ) -> None:
        message = internal_error_message() if error.code in HIDDEN_CAUSE else error.message
        trailers: list[tuple[str, str | bytes]] = [(ERROR_CODE_TRAILER, error.code)]
        retry = error.headers.get("Retry-After")
        retry_s = int(retry) if retry is not None and retry.isdigit() else None
        if retry_s is not None:
            trailers.append(("retry-after", str(retry_s)))
        trailers.append(("grpc-status-details-bin", _status_details(status, message, retry_s)))
        await context.abort(status, message, tuple(trailers))

    # ----------------------------------------------------------------- health, metadata

    async def _ServerLive(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        return protocol.message("ServerLiveResponse")(live=True)

    async def _ServerReady(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        return protocol.message("ServerReadyResponse")(ready=self.state.ready)

    async def _ModelReady(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        try:
            self.v2.check_ready(request.name, request.version or None)
        except ServiceError:
            # Not ready, or no such model: Triton answers both with ready = false.
            return protocol.message("ModelReadyResponse")(ready=False)
        return protocol.message("ModelReadyResponse")(ready=True)

    async def _ServerMetadata(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        return json_format.ParseDict(
            self.v2.server_metadata(), protocol.message("ServerMetadataResponse")()
        )

    async def _ModelMetadata(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        signature = self.v2.check_model(request.name, request.version or None)
        return json_format.ParseDict(
            v2meta.model_metadata(signature), protocol.message("ModelMetadataResponse")()
        )

    async def _ModelConfig(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        config = self.v2.config(request.name, request.version or None)
        response = protocol.message("ModelConfigResponse")()
        json_format.ParseDict(config, response.config, ignore_unknown_fields=True)
        return response

    async def _ModelStatistics(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        stats = await self.v2.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(
            stats, protocol.message("ModelStatisticsResponse")(), ignore_unknown_fields=True
        )

    async def _RepositoryIndex(self, request: Any, context: Any, fields: dict[str, Any]) -> Any:
        models = self.v2.repository_index(request.ready)
        return json_format.ParseDict(
            {"models": models}, protocol.message("RepositoryIndexResponse")()
        )

    # ----------------------------------------------------------------- inference

    async def _ModelInfer(
        self, request: Any, context: grpc.aio.ServicerContext, fields: dict[str, Any]
    ) -> Any:
        settings = self.state.settings
        timeout = settings.request_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)  # the client's deadline only shortens ours
        deadline = time.monotonic() + timeout
        pipeline = self.pipeline
        async with pipeline.accounted():
            pipeline.check_ready()
            signature = self.v2.check_model(request.model_name, request.model_version or None)
            # The message is in memory already (gRPC bounds it by the body limit): count it
            # against the worker's in-flight bytes as an HTTP body is, until the images are in
            # the engine's slots.
            held = self._hold(request.ByteSize())
            try:
                # In a decode thread, as HTTP bodies are parsed: off the event loop.
                infer = await asyncio.get_running_loop().run_in_executor(
                    self.state.pool,
                    decode_infer,
                    request,
                    signature,
                    settings.max_images_per_request,
                )
            except BaseException:
                held.give()
                raise
            fields["images"] = infer.batch_size
            outcome, errors = await self.v2.run(infer, deadline, held=held)
            outputs = infer_outputs(infer, outcome.logits, signature, errors)
        pipeline.answered(outcome)
        response = protocol.message("ModelInferResponse")(
            model_name=signature.model_name,
            model_version=signature.model_version,
            id=infer.id or "",
        )
        for out in outputs:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
            response.raw_output_contents.append(out.raw())
        return response

    def _hold(self, nbytes: int) -> Held[None]:
        budget = self.state.body_budget
        try:
            budget.take(nbytes)
        except BudgetExceededError:
            raise bytes_busy(budget) from None
        return Held(None, budget, nbytes)
