"""The one request pipeline of a worker; every protocol is a thin adapter on it.

images (encoded files or the model's pixels) -> admission at the engine (one global bound)
-> the images into the engine's shared-memory slots (encoded files decoded and preprocessed
in the decode threads under the decode-memory budget; pixels copied) -> the body's bytes leave
the worker's budget -> the engine batches and runs them with every other request -> logits.
A caller that hangs up has its images withdrawn before they cost a model run; whichever way
a request ends, its slots go back exactly once.

How an adapter uses it (``/classify``, ``/v2`` infer, gRPC)::

    pipeline = Pipeline(state)                         # one per worker
    async with pipeline.accounted():                   # request metrics, success or code
        pipeline.check_ready()
        body = await pipeline.read_body(request, deadline, parse)   # HTTP: Held[parsed]
        outcome = await pipeline.run(Files(blobs) | Pixels(array), deadline,
                                     held=body, hangup=wait_for_disconnect)
    outcome.logits   # float32 [n, classes]; rows of failed images are zeros
    outcome.errors   # per image None or its ImageError (status, code, message)
    pipeline.answered(outcome)                         # when answering image by image

Every failure is a :class:`~service.errors.ServiceError` (status, code, message, headers);
a caller gone is :class:`~service.ingress.errors.ClientGoneError`. Ranking is the adapter's
(:mod:`service.ranking`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any, Generic, TypeVar

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from modelcard.schema import ModelCard
from service import wire
from service.errors import ServiceError
from service.ingress import imaging
from service.ingress.budget import BudgetExceededError, ByteBudget
from service.ingress.engine_client import Lease
from service.ingress.errors import ClientGoneError
from service.ingress.plain_jpeg import plain_jpeg
from service.ingress.state import IngressState

T = TypeVar("T")

# A lone image this small is decoded on the event loop instead of in a decode thread: a
# 224x224 JPEG (30-60 KB) drafted for a small model decodes in well under a millisecond, less
# than the thread hop; a bigger file or decode (the header says) goes to the threads, which
# alone can be stopped mid-decode by a deadline or a hang-up.
INLINE_FILE_BYTES = 64 * 2**10
INLINE_DECODE_BYTES = 2**20


@dataclass(frozen=True)
class Files:
    """Encoded image files, decoded and preprocessed as the card says."""

    blobs: Sequence[bytes]

    def __len__(self) -> int:
        return len(self.blobs)


@dataclass(frozen=True)
class Pixels:
    """The model's input tensor ``[N, C, H, W]``, already preprocessed by the client."""

    array: np.ndarray

    def __len__(self) -> int:
        return int(self.array.shape[0])


@dataclass
class Held(Generic[T]):
    """What a body was parsed into, and the bytes it holds against the worker's in-flight
    budget until :meth:`give` (the pipeline gives them once the images are in the slots)."""

    value: T
    budget: ByteBudget
    nbytes: int = 0

    def give(self) -> None:
        self.budget.give(self.nbytes)
        self.nbytes = 0


@dataclass(frozen=True)
class Outcome:
    logits: np.ndarray  # float32 [n, classes]; rows of failed images are zeros
    errors: list[imaging.ImageError | None] = field(default_factory=list)

    @property
    def good(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is None]


class _SlotGuard:
    """Stops a decode thread from writing into slots once the request has let them go (the
    thread cannot be interrupted; the slots may already belong to another request)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True


class Pipeline:
    def __init__(self, state: IngressState) -> None:
        self.state = state
        self.settings = state.settings

    def check_ready(self) -> None:
        self.state.check_serving()

    @property
    def card(self) -> ModelCard:
        card = self.state.card
        if card is None:
            raise ServiceError.of(
                "not_ready", "no model is loaded yet (the engine is starting)", {"Retry-After": "1"}
            )
        return card

    # ----------------------------------------------------------------- accounting

    @contextlib.asynccontextmanager
    async def accounted(self) -> AsyncIterator[None]:
        """One request in the request metrics: its duration, and success or the code it
        failed with (``client_gone`` for a caller that hung up)."""
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        except ClientGoneError:
            self._failure("client_gone")
            raise
        except ServiceError as e:
            self._failure(e.code)
            raise
        finally:
            metrics = self.state.metrics
            if metrics is not None:
                metrics.request_finished(time.perf_counter() - t0, ok)
                if ok:
                    metrics.request_success.inc()

    def _failure(self, code: str) -> None:
        if self.state.metrics is not None:
            self.state.metrics.request_failure(code)

    def answered(self, outcome: Outcome) -> None:
        """The adapter answered image by image: count the images answered with an error (a
        request that fails as a whole counts only as the request's failure)."""
        metrics = self.state.metrics
        if metrics is not None:
            for err in outcome.errors:
                if err is not None:
                    metrics.image_failure(err.code)

    # ----------------------------------------------------------------- body

    async def read_body(
        self,
        request: Request,
        deadline: float,
        parse: Callable[[AsyncIterator[bytes]], Awaitable[T]],
    ) -> Held[T]:
        """``parse`` an HTTP body's chunks under the worker's in-flight byte budget (503) and
        the request deadline (408); a client gone meanwhile is ClientGoneError (499)."""
        budget = self.state.body_budget
        held = Held[None](None, budget)

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                if chunk:
                    budget.take(len(chunk))
                    held.nbytes += len(chunk)
                yield chunk

        try:
            async with asyncio.timeout_at(_loop_time(deadline)):  # no task of its own
                parsed = await parse(counted())
        except BaseException as e:
            held.give()
            if isinstance(e, BudgetExceededError):
                raise bytes_busy(budget) from None
            if isinstance(e, TimeoutError):
                raise ServiceError.of(
                    "request_timeout",
                    "the request body did not arrive within "
                    f"SERESNET_REQUEST_TIMEOUT_S={self.settings.request_timeout_s}",
                    {"Connection": "close"},
                ) from None
            if isinstance(e, ClientDisconnect):
                raise ClientGoneError from None
            raise
        return Held(parsed, budget, held.nbytes)

    # ----------------------------------------------------------------- the run

    async def run(
        self,
        images: Files | Pixels,
        deadline: float,
        *,
        held: Held[Any] | None = None,
        hangup: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Admit, fill the slots, run: the logits of every image and each image's error.
        ``held`` is given back once the images are in the slots (or the request failed);
        ``hangup`` returns when the caller disconnects, which withdraws the images."""
        try:
            card = self.card
            n = len(images)
            if isinstance(images, Files) and n == 1:
                express = self._decode_inline(images.blobs[0], card)
                if express is not None:
                    if held is not None:
                        held.give()
                    return await self._submit(express, card, deadline, hangup)
            lease = await self._admit(n, deadline)
            finished = False  # the engine frees the slots once it has run them
            try:
                errors = await self._fill(lease, images, card, deadline)
                if held is not None:
                    held.give()
                logits = np.zeros((n, card.num_classes), dtype=np.float32)
                good = [i for i, e in enumerate(errors) if e is None]
                if good:
                    logits[good] = await self._run_slots(lease, good, deadline, hangup)
                    finished = True
                return Outcome(logits, errors)
            finally:
                if not finished:
                    lease.release()
        finally:
            if held is not None:
                held.give()

    async def _admit(self, n: int, deadline: float) -> Lease:
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await self.state.engine.admit(n)
        except TimeoutError:
            raise ServiceError.of(
                "deadline_exceeded", "deadline passed while waiting for the engine"
            ) from None

    async def _fill(
        self, lease: Lease, images: Files | Pixels, card: ModelCard, deadline: float
    ) -> list[imaging.ImageError | None]:
        if isinstance(images, Pixels):
            # On the event loop, synchronously: a copy of at most SERESNET_MAX_BODY_BYTES, and
            # no thread can still be writing into the slots if the lease is given back.
            for i in range(len(images)):
                lease.slot(i)[...] = images.array[i]
            return [None] * len(images)
        return await self._decode_into(images.blobs, lease, card, deadline)

    async def _submit(
        self,
        express: np.ndarray | imaging.ImageError,
        card: ModelCard,
        deadline: float,
        hangup: Callable[[], Awaitable[None]] | None,
    ) -> Outcome:
        """One image decoded on the event loop: a bad one never reaches the engine; a good
        one is admitted and run in one message (EngineClient.submit)."""
        if isinstance(express, imaging.ImageError):
            return Outcome(np.zeros((1, card.num_classes), dtype=np.float32), [express])
        logits = await _unless_gone(self.state.engine.submit(express, deadline), hangup)
        return Outcome(logits, [None])

    async def _run_slots(
        self,
        lease: Lease,
        indices: list[int],
        deadline: float,
        hangup: Callable[[], Awaitable[None]] | None,
    ) -> np.ndarray:
        """The engine's logits for the lease's ``indices``; withdraws them if the caller
        hangs up meanwhile."""
        return await _unless_gone(lease.run(indices, deadline), hangup)

    # ----------------------------------------------------------------- decode

    async def _decode_into(
        self, blobs: Sequence[bytes], lease: Lease, card: ModelCard, deadline: float
    ) -> list[imaging.ImageError | None]:
        """Decode ``blobs`` into the lease's slots in the worker's decode threads; per image
        None or its error. 504 when the deadline passes first."""
        state = self.state
        guard = _SlotGuard()
        loop = asyncio.get_running_loop()
        metrics = state.metrics
        if metrics is not None:
            metrics.preprocess_backlog.inc(len(blobs))
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await loop.run_in_executor(
                    state.pool, self._prepare, blobs, lease, guard, card, deadline
                )
        except TimeoutError:
            raise ServiceError.of(
                "deadline_exceeded", "deadline passed while decoding the images"
            ) from None
        finally:
            guard.cancel()
            if metrics is not None:
                metrics.preprocess_backlog.dec(len(blobs))

    def _decode_inline(
        self, data: bytes, card: ModelCard
    ) -> np.ndarray | imaging.ImageError | None:
        """One image decoded on the event loop when that costs less than the hop to a decode
        thread and back (about half a millisecond on a loaded core): a file of at most
        INLINE_FILE_BYTES whose header promises a decode of at most INLINE_DECODE_BYTES, with
        room in the decode budget now, for a model whose input fits a Submit. A plain JPEG
        takes the TurboJPEG lane (:mod:`~service.ingress.plain_jpeg`), any other image
        Pillow's. Its pixels, or its error; None when it is not such an image: the threads
        decode it into a slot (and give the big-image errors their full text)."""
        if len(data) > INLINE_FILE_BYTES or _input_bytes(card) > wire.MAX_SUBMIT_BYTES:
            return None
        spec = card.input
        t0 = time.perf_counter()
        plain = plain_jpeg(data, spec, self.settings.max_image_pixels)
        if plain is not None and plain.cost <= INLINE_DECODE_BYTES:
            try:
                with self.state.decode_budget.reserve(plain.cost, deadline=0.0):
                    pixels = plain.to_array(spec)
            except BudgetExceededError:
                return None
            if pixels is not None:
                self._decoded(t0)
                return pixels
        try:
            image = imaging.open_checked(data, self.settings.max_image_pixels)
        except imaging.ImageError as e:
            return e
        imaging.draft(image, spec)
        cost = imaging.decode_cost(image, spec)
        if cost > INLINE_DECODE_BYTES:
            image.close()
            return None
        try:
            # No waiting on the event loop: a budget taken by the threads sends it to them.
            with self.state.decode_budget.reserve(cost, deadline=0.0):
                array = imaging.finish(image, spec)
        except BudgetExceededError:
            image.close()
            return None
        except imaging.ImageError as e:
            return e
        self._decoded(t0)
        return array

    def _decoded(self, t0: float) -> None:
        if self.state.metrics is not None:
            self.state.metrics.preprocess_duration.observe(time.perf_counter() - t0)

    def _prepare(
        self,
        blobs: Sequence[bytes],
        lease: Lease,
        guard: _SlotGuard,
        card: ModelCard,
        deadline: float,
    ) -> list[imaging.ImageError | None]:
        """In a decode thread: every image into its slot; per image, None or its error."""
        metrics = self.state.metrics
        out: list[imaging.ImageError | None] = []
        for i, data in enumerate(blobs):
            t0 = time.perf_counter()
            try:
                array = self._decode(data, card, deadline, guard)
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

    def _decode(
        self, data: bytes, card: ModelCard, deadline: float, guard: _SlotGuard
    ) -> np.ndarray:
        spec = card.input
        # The decode stops at its next read once the request is gone or past its deadline:
        # the thread cannot be interrupted, and a runaway decode would keep its CPU.
        image = imaging.open_checked(
            data,
            self.settings.max_image_pixels,
            lambda: guard.cancelled or time.monotonic() > deadline,
        )
        imaging.draft(image, spec)
        cost = imaging.decode_cost(image, spec)
        try:
            with self.state.decode_budget.reserve(cost, deadline):
                return imaging.finish(image, spec)
        except BudgetExceededError as e:
            image.close()
            if e.fits_at_all:
                raise imaging.ImageError(
                    504, "deadline_exceeded", "deadline passed while waiting for decode memory"
                ) from None
            raise imaging.ImageError(
                413,
                "image_too_large",
                f"{image.format} of {image.width}x{image.height} ({image.mode}) needs "
                f"about {cost / 2**20:.0f} MiB to decode, more than this worker's "
                f"decode memory of {e.limit // 2**20} MiB (SERESNET_DECODE_MEMORY_MB)",
            ) from None


async def _unless_gone(
    run: Awaitable[np.ndarray], hangup: Callable[[], Awaitable[None]] | None
) -> np.ndarray:
    """``run``'s logits, or ClientGoneError (``run`` cancelled) once ``hangup`` returns."""
    if hangup is None:
        return await run
    submit = asyncio.ensure_future(run)
    gone = asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not submit.done():
        submit.cancel()
        raise ClientGoneError
    return submit.result()


def _input_bytes(card: ModelCard) -> int:
    return prod(card.input.shape) * np.dtype(card.input.dtype).itemsize


def _loop_time(deadline: float) -> float:
    """``deadline`` (time.monotonic()) on the running loop's clock, for asyncio.timeout_at."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def bytes_busy(budget: ByteBudget) -> ServiceError:
    """The answer when a worker's request bytes in flight would pass their budget."""
    return ServiceError.of(
        "busy",
        "too many request bytes in flight on this worker "
        f"(SERESNET_MAX_INFLIGHT_BODY_MB={budget.limit // 2**20}); retry",
        {"Retry-After": "1"},
    )


def http_hangup(receive: Receive) -> Callable[[], Awaitable[None]]:
    """The ``hangup`` of an HTTP request whose body has been read: the next ASGI message can
    only be the disconnect."""

    async def wait() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    return wait
