"""The work behind the routes: body -> images -> slots -> engine -> answers.

``POST /classify`` in one worker: body read under the byte limits and the request deadline
(:mod:`~service.ingress.bodies`) -> admission at the engine (one global bound) -> header check,
decode and preprocess of every image in a decode thread, straight into the engine's shared
memory, under the decode-memory budget -> the engine batches and runs them -> top-k -> JSON.
A caller that hangs up has its images withdrawn before they cost a model run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from modelcard.schema import ModelCard
from service.ingress import imaging
from service.ingress.bodies import BodyError, Upload, read_uploads
from service.ingress.budget import BudgetExceededError
from service.ingress.engine_client import EngineCallError, Lease
from service.ingress.errors import ApiError, ClientGoneError
from service.ingress.state import IngressState

T = TypeVar("T")


class _SlotGuard:
    """Stops a decode thread from writing into slots once the request has let them go (the
    thread cannot be interrupted; the slots may already belong to another request)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True


class DataPlane:
    def __init__(self, state: IngressState) -> None:
        self.state = state
        self.settings = state.settings

    # ----------------------------------------------------------------- body

    async def read_body(self, request: Request, deadline: float) -> tuple[list[Upload], int]:
        """The request's images, and the body bytes they hold against the worker's budget
        (give them back with ``state.body_budget.give``)."""
        settings = self.settings
        return await self.read_limited_body(
            request,
            deadline,
            lambda chunks: read_uploads(
                request.headers, chunks, settings.max_body_bytes, settings.max_images_per_request
            ),
        )

    async def read_limited_body(
        self,
        request: Request,
        deadline: float,
        parse: Callable[[AsyncIterator[bytes]], Awaitable[T]],
    ) -> tuple[T, int]:
        """``parse`` the body's chunks under the worker's in-flight byte budget (503) and the
        request deadline (408); a client gone meanwhile is ClientGoneError (499). Returns what
        ``parse`` made and the bytes it holds against the budget."""
        budget = self.state.body_budget
        held = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal held
            async for chunk in request.stream():
                if chunk:
                    budget.take(len(chunk))
                    held += len(chunk)
                yield chunk

        try:
            parsed = await asyncio.wait_for(parse(counted()), max(0.0, deadline - time.monotonic()))
        except BaseException as e:
            budget.give(held)
            if isinstance(e, BodyError):
                raise ApiError(e.status, e.code, e.message) from None
            if isinstance(e, BudgetExceededError):
                raise ApiError(
                    503,
                    "busy",
                    "too many request bytes in flight on this worker "
                    f"(SERESNET_MAX_INFLIGHT_BODY_MB={budget.limit // 2**20}); retry",
                    {"Retry-After": "1"},
                ) from None
            if isinstance(e, TimeoutError):
                raise ApiError(
                    408,
                    "request_timeout",
                    "the request body did not arrive within "
                    f"SERESNET_REQUEST_TIMEOUT_S={self.settings.request_timeout_s}",
                    {"Connection": "close"},
                ) from None
            if isinstance(e, ClientDisconnect):
                raise ClientGoneError from None
            raise
        return parsed, held

    # ----------------------------------------------------------------- admission

    async def admit(self, n: int, deadline: float) -> Lease:
        try:
            return await asyncio.wait_for(
                self.state.engine.admit(n), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise ApiError(
                504, "deadline_exceeded", "deadline passed while waiting for the engine"
            ) from None

    # ----------------------------------------------------------------- decode

    def _prepare(
        self,
        blobs: Sequence[bytes],
        lease: Lease,
        guard: _SlotGuard,
        card: ModelCard,
        deadline: float,
    ) -> list[imaging.ImageError | None]:
        """In a decode thread: every image into its slot; per image, None or its error."""
        spec = card.input
        budget = self.state.decode_budget
        metrics = self.state.metrics
        out: list[imaging.ImageError | None] = []
        for i, data in enumerate(blobs):
            t0 = time.perf_counter()
            try:
                image = imaging.open_checked(
                    data,
                    self.settings.max_image_pixels,
                    lambda: guard.cancelled or time.monotonic() > deadline,
                )
                imaging.draft(image, spec)
                cost = imaging.decode_cost(image, spec)
                try:
                    with budget.reserve(cost, deadline):
                        array = imaging.finish(image, spec)
                except BudgetExceededError as e:
                    image.close()
                    if e.fits_at_all:
                        raise imaging.ImageError(
                            504,
                            "deadline_exceeded",
                            "deadline passed while waiting for decode memory",
                        ) from None
                    raise imaging.ImageError(
                        413,
                        "image_too_large",
                        f"{image.format} of {image.width}x{image.height} ({image.mode}) needs "
                        f"about {cost / 2**20:.0f} MiB to decode, more than this worker's "
                        f"decode memory of {e.limit // 2**20} MiB (SERESNET_DECODE_MEMORY_MB)",
                    ) from None
            except imaging.ImageError as e:
                out.append(e)
                continue
            with guard.lock:
                if guard.cancelled:
                    return out
                lease.slot(i)[...] = array
            out.append(None)
            if metrics is not None:
                metrics.preprocess_duration.observe(time.perf_counter() - t0)
        return out

    async def decode_into(
        self,
        blobs: Sequence[bytes],
        lease: Lease,
        deadline: float,
    ) -> list[imaging.ImageError | None]:
        """Decode ``blobs`` into the lease's slots (in the worker's decode threads, never on
        the event loop); per image None or its error. 504 when the deadline passes first."""
        state = self.state
        assert state.card is not None
        guard = _SlotGuard()
        loop = asyncio.get_running_loop()
        metrics = state.metrics
        if metrics is not None:
            metrics.preprocess_backlog.inc(len(blobs))
        try:
            future = loop.run_in_executor(
                state.pool, self._prepare, blobs, lease, guard, state.card, deadline
            )
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(
                504, "deadline_exceeded", "deadline passed while decoding the images"
            ) from None
        finally:
            guard.cancel()
            if metrics is not None:
                metrics.preprocess_backlog.dec(len(blobs))

    # ----------------------------------------------------------------- run

    async def run(
        self,
        lease: Lease,
        indices: list[int],
        deadline: float,
        want: tuple[Any, ...],
        receive: Receive | None,
    ) -> Any:
        """The engine's answer for the lease's ``indices``; withdraws them if the caller
        hangs up (``receive`` given) meanwhile."""
        submit = asyncio.ensure_future(lease.run(indices, deadline, want))
        if receive is None:
            return await submit
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not submit.done():
            submit.cancel()
            raise ClientGoneError
        return submit.result()

    # ----------------------------------------------------------------- /classify

    async def classify(self, request: Request, k: int, deadline: float) -> dict[str, Any]:
        state = self.state
        state.check_ready()
        uploads, held = await self.read_body(request, deadline)
        request.state.images = len(uploads)
        try:
            lease = await self.admit(len(uploads), deadline)
            finished = False
            try:
                errors = await self.decode_into([u.data for u in uploads], lease, deadline)
                state.body_budget.give(held)
                held = 0
                good = [i for i, e in enumerate(errors) if e is None]
                if len(uploads) == 1 and not good:
                    err = errors[0]
                    assert err is not None
                    raise ApiError(err.status, err.code, f"{uploads[0].filename}: {err.message}")
                top: tuple[np.ndarray, np.ndarray] | None = None
                if good:
                    top = await self.run(lease, good, deadline, ("topk", k), request.receive)
                    finished = True  # the engine frees the slots once it has run them
            finally:
                if not finished:
                    lease.release()
        except EngineCallError as e:
            raise ApiError(e.status, e.code, e.message, e.headers) from None
        finally:
            state.body_budget.give(held)
        return self._answer(uploads, errors, top)

    def _answer(
        self,
        uploads: Sequence[Upload],
        errors: Sequence[imaging.ImageError | None],
        top: tuple[np.ndarray, np.ndarray] | None,
    ) -> dict[str, Any]:
        card = self.state.card
        assert card is not None
        metrics = self.state.metrics
        labels = card.labels
        results: list[dict[str, Any]] = []
        row = 0
        for upload, err in zip(uploads, errors, strict=True):
            if err is not None:
                if metrics is not None:
                    metrics.image_failure(err.code)
                results.append(
                    {
                        "filename": upload.filename,
                        "error": {"code": err.code, "message": err.message},
                    }
                )
                continue
            assert top is not None
            ids, probs = top[0][row].tolist(), top[1][row].tolist()
            results.append(
                {
                    "filename": upload.filename,
                    "predictions": [
                        {"label": labels[c], "class_id": c, "score": p}
                        for c, p in zip(ids, probs, strict=True)
                    ],
                }
            )
            row += 1
        return {"model": card.name, "model_version": card.version, "results": results}


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the client hangs up. Only called after the body is read, when the next
    ASGI message can only be the disconnect."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
