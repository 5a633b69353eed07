"""Dynamic batching in one process (in the manner of Triton's dynamic batcher and Ray Serve's
``@serve.batch``).

Callers ``await submit(images)``; each call is one future. Its images join a bounded queue as
separate items, so one request's images may be spread over several batches; each result row is
written back at its index and the future resolves when the last row arrives.

A batch is dispatched when it is full, when its oldest image has waited ``max_queue_delay``, or
at once when no more images are on their way: the owner says which are with :meth:`expect`
(admitted, still being decoded) and :meth:`settle` (queued, or not coming after all). Waiting
only pays when it can fill the batch, so a lone caller never waits for the delay, while images
that are still being decoded elsewhere are waited for (``always_wait`` restores a fixed delay:
every batch that is not full waits it out). While the model runs, the queue keeps
filling, so under load batches form without waiting at all.

The model runs in one dedicated thread, so that the loop stays free to take and refuse work,
answer heartbeats and drop the images of callers gone meanwhile while it runs; only a lone
image whose runs have lately taken under ``inline_below_s`` runs on the loop itself (a small
model on the CPU, one client at a time), where the two thread hops cost more than the run.
A failing batch fails every caller that had an image in it (each gets its own exception).
Images of callers that gave up (cancelled, disconnected, past their deadline) are dropped
before a batch is formed, so they cost no model run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

log = logging.getLogger("service.batcher")

RunBatch = Callable[[Sequence[np.ndarray]], np.ndarray]
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The queue cannot take the request's images now; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before all its images were run."""


class BatchFailedError(RuntimeError):
    """The model run of a batch holding one of the caller's images raised."""


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down and takes no new work."""


class BatchObserver(Protocol):
    """Receives what metrics need; called on the event loop."""

    def on_batch(
        self, size: int, queue_waits: Sequence[float], compute_s: float, failed: bool
    ) -> None: ...

    def on_dropped(self, reason: str, images: int) -> None: ...

    def on_depth(self, depth: int) -> None: ...


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[np.ndarray]
    size: int
    deadline: float
    remaining: int = 0
    rows: np.ndarray | None = None
    gave_up: str = "cancelled"  # why its queued images are dropped once its future is done


@dataclass(eq=False)
class _Item:
    request: _Request
    index: int
    image: np.ndarray
    enqueued: float


@dataclass
class BatcherStats:
    """Counters for tests and logs (metrics get the same through the observer)."""

    batches: int = 0
    images_run: int = 0
    failed_batches: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class Batcher:
    """Coalesce concurrent ``submit`` calls into batches for ``run_batch``.

    ``run_batch(images)`` gets 1..max_batch_size arrays and must return one row per image.
    Call :meth:`start` inside the running loop and :meth:`close` to drain and stop.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
        always_wait: bool = False,
        inline_below_s: float = 0.0,
    ) -> None:
        if not callable(run_batch):
            raise TypeError(f"run_batch must be callable, got {type(run_batch).__name__}")
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.max_queue_size = _positive_int("max_queue_size", max_queue_size)
        if (
            isinstance(max_queue_delay_s, bool)
            or not isinstance(max_queue_delay_s, int | float)
            or not math.isfinite(max_queue_delay_s)
            or max_queue_delay_s < 0
        ):
            raise ValueError(
                f"max_queue_delay_s must be a finite number >= 0, got {max_queue_delay_s!r}"
            )
        self.max_queue_delay_s = float(max_queue_delay_s)
        self._run_batch = run_batch
        self._observer = observer
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._flushing = False
        self._mean_batch_s = 0.0
        self.inline_below_s = inline_below_s
        self._lone_s = math.inf  # smoothed run time of a batch of one
        self._batch_done: asyncio.Future[None] | None = None
        self.in_flight = 0  # images of the batch being run now
        self._expected = 0  # images on their way to submit(): see expect()
        # A fixed delay instead: every batch that is not full waits, whatever is on its way.
        self.always_wait = always_wait
        self.stats = BatcherStats()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop taking work, run what is queued (without waiting for batches to fill), stop."""
        self._closing = True
        if self._task is None:
            return
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            self._fail_queued(BatcherClosedError("shut down before this image was run"))
        except Exception:  # the loop already logged and failed its callers
            pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def flush(self) -> None:
        """From now on dispatch without waiting for batches to fill (shutdown has begun);
        new work is still taken until :meth:`close`."""
        self._flushing = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread that runs the batches, between batches. Warm-up
        goes through here: ORT's CUDA provider keeps captured graphs per thread."""
        if self._executor is None:
            raise BatcherClosedError("batcher not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def expect(self, n: int) -> None:
        """``n`` more images are on their way (admitted, decoding): a batch that is not full
        waits for them, up to ``max_queue_delay``, before it is dispatched."""
        self._expected += n

    def settle(self, n: int) -> None:
        """``n`` of the expected images are no longer on their way: about to be submitted, or
        not coming (failed to decode, caller gone). Call it before ``submit``."""
        self._expected = max(0, self._expected - n)
        if self._wakeup is not None and self._expected == 0:
            self._wakeup.set()  # a batch waiting only for them goes now

    @property
    def expected(self) -> int:
        """Images announced with :meth:`expect` and not settled yet."""
        return self._expected

    @property
    def depth(self) -> int:
        """Images queued and not yet handed to the model."""
        return len(self._queue)

    async def current_batch_done(self) -> None:
        """Returns once the batch being run now (if any) has finished: after that, no image
        handed to the model so far is read again (callers reuse their buffers then)."""
        if self._batch_done is not None:
            await asyncio.shield(self._batch_done)

    def retry_after_s(self) -> int:
        """A Retry-After hint: roughly how long the current queue takes to clear."""
        batches = math.ceil(max(1, self.depth) / self.max_batch_size)
        return max(1, math.ceil(batches * max(self._mean_batch_s, self.max_queue_delay_s)))

    # ----------------------------------------------------------------- callers

    async def submit(
        self,
        images: Sequence[np.ndarray],
        deadline: float | None = None,
    ) -> np.ndarray:
        """Run ``images`` (any number; they may be split over batches) and return their rows in
        order. ``deadline`` is a ``time.monotonic()`` value. Raises QueueFullError,
        DeadlineExceededError, BatchFailedError or BatcherClosedError."""
        if self._task is None or self._wakeup is None:
            raise BatcherClosedError("batcher not started")
        if self._closing or self._task.done():
            raise BatcherClosedError("shutting down; not taking new work")
        if not isinstance(images, Sequence) or isinstance(images, str | bytes):
            raise TypeError("images must be a sequence of arrays")
        if len(images) == 0:
            raise ValueError("submit() needs at least one image")
        if not all(isinstance(a, np.ndarray) for a in images):
            raise TypeError("every image must be a numpy array")
        if len(self._queue) + len(images) > self.max_queue_size:
            self._drop_observed("queue_full", len(images))
            raise QueueFullError(
                f"queue full: {len(self._queue)} images waiting, {len(images)} more would exceed "
                f"SERESNET_MAX_QUEUE_SIZE={self.max_queue_size}",
                self.retry_after_s(),
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError("deadline passed before the images were queued")
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), len(images), deadline or math.inf, len(images))
        self._queue.extend(_Item(request, i, a, now) for i, a in enumerate(images))
        self._depth_observed()
        self._wakeup.set()
        when = None if deadline is None else loop.time() + (deadline - time.monotonic())
        try:
            async with asyncio.timeout_at(when):
                return await request.future
        except TimeoutError:
            request.gave_up = "deadline"
            self._purge(request)
            raise DeadlineExceededError(
                f"deadline passed with {request.remaining} of {request.size} images not run"
            ) from None
        except asyncio.CancelledError:
            self._purge(request)
            raise

    # ----------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        try:
            await self._serve()
        except BaseException as e:
            # A bug here must not leave callers hanging: fail them and refuse new work.
            self._closing = True
            self._fail_queued(BatcherClosedError(f"batcher stopped: {type(e).__name__}: {e}"))
            if not isinstance(e, asyncio.CancelledError):
                log.exception("batcher loop crashed")
            raise

    async def _serve(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for more only while the batch is not full, more images are on their way and
            # the oldest image has time.
            while (
                len(self._queue) < self.max_batch_size
                and (self._expected > 0 or self.always_wait)
                and not self._closing
                and not self._flushing
            ):
                wait = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
                if wait <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                self._batch_done = loop.create_future()
                self.in_flight = len(batch)
                try:
                    await self._execute(loop, batch)
                finally:
                    self.in_flight = 0
                    self._batch_done.set_result(None)
                    self._batch_done = None

    def _take(self) -> list[_Item]:
        """Pop up to max_batch_size live items, dropping those nobody waits for any more."""
        batch: list[_Item] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            request = item.request
            if request.future.done():
                self._drop_observed(request.gave_up, 1)
                continue
            if now >= request.deadline:
                request.gave_up = "deadline"
                request.future.set_exception(
                    DeadlineExceededError(
                        f"deadline passed with {request.remaining} of {request.size} images not run"
                    )
                )
                self._drop_observed("deadline", 1)
                continue
            batch.append(item)
        self._depth_observed()
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        started = time.monotonic()
        waits = [started - item.enqueued for item in batch]
        images = [item.image for item in batch]
        t0 = time.perf_counter()
        try:
            if len(batch) == 1 and self._lone_s < self.inline_below_s:
                rows = self._run_batch(images)
            else:
                rows = await loop.run_in_executor(self._executor, self._run_batch, images)
            if not isinstance(rows, np.ndarray) or rows.shape[:1] != (len(batch),):
                raise BatchFailedError(
                    f"run_batch returned {getattr(rows, 'shape', type(rows).__name__)} "
                    f"for a batch of {len(batch)}"
                )
        except Exception as e:  # every cause is fanned out to the callers
            compute = time.perf_counter() - t0
            self._record(len(batch), waits, compute, failed=True)
            log.error("batch failed", extra={"batch_size": len(batch), "cause": repr(e)})
            for request in {id(item.request): item.request for item in batch}.values():
                if not request.future.done():
                    request.gave_up = "batch_failed"
                    err = BatchFailedError(f"model run failed: {type(e).__name__}: {e}")
                    err.__cause__ = e
                    request.future.set_exception(err)
            return
        compute = time.perf_counter() - t0
        self._record(len(batch), waits, compute, failed=False)
        for item, row in zip(batch, rows, strict=True):
            request = item.request
            if request.future.done():
                continue
            if request.rows is None:
                request.rows = np.empty((request.size, *row.shape), dtype=rows.dtype)
            request.rows[item.index] = row
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.rows)

    # ----------------------------------------------------------------- bookkeeping

    def _record(self, size: int, waits: list[float], compute: float, failed: bool) -> None:
        self.stats.batches += 1
        self.stats.batch_sizes[size] += 1
        if failed:
            self.stats.failed_batches += 1
        else:
            self.stats.images_run += size
            # A smoothed batch time feeds the Retry-After hint.
            self._mean_batch_s = (
                compute if not self._mean_batch_s else (0.9 * self._mean_batch_s + 0.1 * compute)
            )
            if size == 1:
                lone = self._lone_s
                self._lone_s = compute if lone == math.inf else 0.8 * lone + 0.2 * compute
        if self._observer is not None:
            self._observer.on_batch(size, waits, compute, failed)

    def _drop_observed(self, reason: str, images: int) -> None:
        self.stats.dropped[reason] += images
        if self._observer is not None:
            self._observer.on_dropped(reason, images)

    def _depth_observed(self) -> None:
        if self._observer is not None:
            self._observer.on_depth(len(self._queue))

    def _purge(self, request: _Request) -> None:
        """Take a caller's images out of the queue at once, so they stop holding queue
        space (and count as dropped) the moment the caller gives up."""
        if request.future.done() and not request.future.cancelled():
            return  # answered: nothing of it is queued any more
        kept = [item for item in self._queue if item.request is not request]
        dropped = len(self._queue) - len(kept)
        if dropped:
            self._queue = collections.deque(kept)
            self._drop_observed(request.gave_up, dropped)
            self._depth_observed()

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            request = self._queue.popleft().request
            if not request.future.done():
                request.future.set_exception(error)
        self._depth_observed()
