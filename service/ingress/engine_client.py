"""A worker's connection to the engine process (:mod:`service.wire`).

:meth:`EngineClient.admit` reserves shared-memory slots for a request's images (the engine
counts them against the one global queue bound), the worker writes preprocessed pixels into
:meth:`Lease.slot` views, and :meth:`Lease.run` has them batched and run. If the engine goes
away, every waiting call fails with :class:`EngineUnavailableError` (503), readiness turns
false, and the client reconnects when the supervisor has restarted the engine. An engine that
is there but does not answer (stopped, hung) is found by a heartbeat: readiness turns false
until it answers again, and a run that outlives its deadline is answered 504 by the worker
itself, whatever the engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service import wire
from service.errors import ServiceError, status_of
from service.slots import SlotArena, SlotArenaError

log = logging.getLogger("service.ingress.engine")

RECONNECT_INTERVAL_S = 0.1
# A ping per interval; an engine that leaves one unanswered this long is "not answering" (its
# event loop answers at once even while a batch runs: inference is on the batcher's thread).
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 2.0
# A live engine answers 504 itself at the deadline (and counts the drop); the worker's own
# timeout waits this much longer so that it only fires when the engine cannot answer.
ENGINE_GRACE_S = 0.25


class EngineCallError(ServiceError):
    """The engine refused or failed a call; its code's status is the HTTP status."""


class EngineUnavailableError(EngineCallError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "engine_unavailable", message, {"Retry-After": "1"})


def _failure(code: str, message: str, retry_after: int | None) -> EngineCallError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return EngineCallError(status_of(code), code, message, headers)


async def _within(call: Awaitable[np.ndarray], deadline: float) -> np.ndarray:
    """The logits of a run; the engine answers 504 itself at the deadline, this holds when it
    cannot (a stopped or hung engine)."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + ENGINE_GRACE_S):
            return await call
    except TimeoutError:
        raise EngineCallError(
            504, "deadline_exceeded", "deadline passed while the engine ran the images"
        ) from None


class Lease:
    """Slots the engine reserved for one request's images."""

    def __init__(
        self, client: EngineClient, rid: int, slots: list[int], arena: SlotArena, generation: int
    ) -> None:
        self._client = client
        self.rid = rid
        self.slots = slots
        self._arena = arena
        self._generation = generation

    def slot(self, i: int) -> np.ndarray:
        """Writable [C, H, W] view of the request's ``i``-th slot."""
        return self._arena.slot(self.slots[i])

    async def run(self, indices: Sequence[int], deadline: float) -> np.ndarray:
        """Batch and run the images in slots ``indices`` (the others failed to decode and are
        given back): their logits, float32 ``[len(indices), classes]``."""
        used = [self.slots[i] for i in indices]
        call = self._client._call(
            wire.Run(self.rid, tuple(used), deadline), self.rid, self._generation
        )
        return await _within(call, deadline)  # the caller's release withdraws the images

    def release(self) -> None:
        """The caller is gone (or the request failed before its run): give the slots back."""
        self._client._release(self.rid, self._generation)


class EngineClient:
    def __init__(
        self, socket_path: Path, on_hello: Callable[[wire.EngineHello], None] | None = None
    ) -> None:
        self.socket_path = socket_path
        self.hello: wire.EngineHello | None = None
        self._reported_ready = False  # as the engine last said
        self._reported_reason = "waiting for the engine"
        self._silent_since: float | None = None  # a heartbeat is overdue since then
        self._on_hello = on_hello
        self._arena: SlotArena | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._rids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._maintain(), name="engine")

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            self._writer.close()
        if self._arena is not None:
            self._arena.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def ready(self) -> bool:
        return self._reported_ready and self._silent_since is None

    @property
    def not_ready_reason(self) -> str:
        if self._silent_since is not None:
            return (
                f"waiting for the engine, which has not answered for "
                f"{time.monotonic() - self._silent_since:.0f} s"
            )
        return self._reported_reason

    async def _heartbeat(self) -> None:
        """Ping the engine; readiness is false while a ping goes unanswered too long."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            rid = next(self._rids)
            sent = time.monotonic()
            try:
                await asyncio.wait_for(self._call(wire.Ping(rid), rid), HEARTBEAT_TIMEOUT_S)
            except EngineUnavailableError:
                return  # the connection is gone: the next session starts its own heartbeat
            except TimeoutError:
                if self._silent_since is None:
                    self._silent_since = sent
                    log.warning("engine not answering", extra={"timeout_s": HEARTBEAT_TIMEOUT_S})
                continue
            if self._silent_since is not None:
                log.info(
                    "engine answering again",
                    extra={"silent_s": round(time.monotonic() - self._silent_since, 1)},
                )
                self._silent_since = None

    async def _maintain(self) -> None:
        logged_wait = False
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError:
                if not logged_wait:
                    log.info("waiting for the engine", extra={"socket": str(self.socket_path)})
                    logged_wait = True
                await asyncio.sleep(RECONNECT_INTERVAL_S)
                continue
            logged_wait = False
            try:
                await self._session(reader, writer)
            except (
                asyncio.IncompleteReadError,
                ConnectionError,
                wire.ProtocolError,
                SlotArenaError,
            ) as e:
                if not self._closing:
                    log.warning("engine connection lost", extra={"cause": repr(e)})
            finally:
                self._lost(writer)
            await asyncio.sleep(RECONNECT_INTERVAL_S)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await wire.read_message(reader)
        if not isinstance(hello, wire.EngineHello):
            raise wire.ProtocolError(f"expected hello, got {type(hello).__name__}")
        if self._arena is None or self.hello is None or hello.shm_path != self.hello.shm_path:
            if self._arena is not None:
                self._arena.close()
            self._arena = SlotArena(
                Path(hello.shm_path), hello.slot_shape, hello.slot_dtype, hello.slots, create=False
            )
        self.hello = hello
        self._reported_ready, self._reported_reason = hello.ready, hello.not_ready_reason
        self._silent_since = None
        self._writer = writer
        self._connected.set()
        if self._on_hello is not None:
            self._on_hello(hello)
        log.info(
            "engine connected",
            extra={"engine_pid": hello.pid, "generation": hello.generation, "ready": hello.ready},
        )
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(), name="heartbeat")
        try:
            while True:
                self._receive(await wire.read_message(reader))
        finally:
            heartbeat.cancel()

    def _receive(self, message: wire.Message) -> None:
        match message:
            case wire.StateChanged(ready, reason):
                self._reported_ready, self._reported_reason = ready, reason
            case wire.Granted(rid, slots):
                self._resolve(rid, result=list(slots))
            case wire.Done(rid, logits):
                self._resolve(rid, result=logits)
            case wire.Pong(rid):
                self._resolve(rid)
            case wire.Failed(rid, code, text, retry_after):
                self._resolve(rid, error=_failure(code, text, retry_after))
            case _:
                raise wire.ProtocolError(f"unexpected message {type(message).__name__}")

    def _resolve(self, rid: int, result: Any = None, error: EngineCallError | None = None) -> None:
        future = self._pending.pop(rid, None)
        if future is None or future.done():
            return  # the caller gave up meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _lost(self, writer: asyncio.StreamWriter) -> None:
        self._connected.clear()
        self._writer = None
        self._reported_ready = False
        self._reported_reason = "the engine process is restarting"
        self._silent_since = None
        writer.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    EngineUnavailableError(
                        "the engine process stopped while this request waited; retry"
                    )
                )

    # ----------------------------------------------------------------- calls

    def _send(self, message: wire.ToEngine) -> None:
        if self._writer is None or self._writer.is_closing():
            raise EngineUnavailableError("the engine process is not running; retry")
        self._writer.write(wire.encode(message))

    async def _call(self, message: wire.ToEngine, rid: int, generation: int | None = None) -> Any:
        if generation is not None and (
            self.hello is None or self.hello.generation != generation or not self.connected
        ):
            raise EngineUnavailableError("the engine process restarted; retry")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            self._send(message)
            return await future
        finally:
            self._pending.pop(rid, None)

    async def admit(self, n: int) -> Lease:
        """Reserve ``n`` slots; raises EngineCallError (503 queue_full / not_ready) or
        EngineUnavailableError."""
        if not self.connected or self.hello is None or self._arena is None:
            raise EngineUnavailableError(f"the engine is not available ({self.not_ready_reason})")
        rid = next(self._rids)
        generation = self.hello.generation
        arena = self._arena
        try:
            slots = await self._call(wire.Admit(rid, n), rid)
        except asyncio.CancelledError:
            # The caller gave up (deadline, disconnect) while the grant may be on its way:
            # release it, or its slots would stay leased until this worker reconnects.
            self._release(rid, generation)
            raise
        return Lease(self, rid, list(slots), arena, generation)

    async def submit(self, pixels: np.ndarray, deadline: float) -> np.ndarray:
        """Admit and run one preprocessed image (``pixels``: the slots' shape and dtype, at
        most wire.MAX_SUBMIT_BYTES) in one message: its logits, float32 ``[1, classes]``.
        Raises as :meth:`admit` and :meth:`Lease.run` do; a cancelled call withdraws it."""
        if not self.connected or self.hello is None:
            raise EngineUnavailableError(f"the engine is not available ({self.not_ready_reason})")
        rid = next(self._rids)
        generation = self.hello.generation
        try:
            return await _within(
                self._call(wire.Submit(rid, pixels, deadline), rid, generation), deadline
            )
        except BaseException:
            # Cancelled, or the worker's own timeout: the engine may hold it (a refusal of the
            # engine's own has freed it already, and the release is then ignored).
            self._release(rid, generation)
            raise

    def _release(self, rid: int, generation: int) -> None:
        self._pending.pop(rid, None)
        if self.hello is not None and self.hello.generation == generation:
            with contextlib.suppress(EngineUnavailableError):
                self._send(wire.Release(rid))
