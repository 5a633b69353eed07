"""The engine process: one ONNX Runtime session, the dynamic batcher and the shared-memory slots,
served to the ingress workers over a Unix socket (:mod:`service.wire`).

The engine is the one place that counts admitted images, so the queue bound holds across all
workers: a worker asks for ``n`` slots before it decodes a request's images (``admit``), writes
the preprocessed pixels into them, and asks for a run (``run``). Batches form from every
worker's images. A slot is free again once its image has been run, or its caller is gone and
no batch being run still reads it.

Started by the supervisor (:mod:`service.supervisor`) with :func:`main`; it reports "loaded"
(or why it cannot load) on a pipe, warms every batch shape up, then reports ready to every
connected worker. SIGTERM drains: queued images run without waiting for fuller batches, and
the process exits when the workers have gone (or the drain timeout passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import uvloop

from service import logs, wire
from service.engine.batcher import (
    Batcher,
    BatcherClosedError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
)
from service.engine.config import EXIT_LOAD_FAILED, EXIT_WARMUP_FAILED, EngineConfig
from service.engine.model import Engine
from service.engine.policy import EngineError
from service.metrics import EngineMetrics
from service.slots import SlotArena, slot_count

log = logging.getLogger("service.engine")

# A lone image whose runs take less than this runs on the event loop, without the two thread
# hops; the loop (heartbeats, admissions) is held no longer than about this.
INLINE_LONE_S = 0.001


@dataclass(frozen=True)
class EngineProcessConfig:
    """What the supervisor hands the engine process (picklable)."""

    engine: EngineConfig
    socket_path: Path
    shm_path: Path
    generation: int
    max_queue_size: int
    max_queue_delay_ms: float
    warmup_rounds: int
    drain_timeout_s: float
    log_level: str
    log_format: str
    batch_wait: str = "expected"  # or "always" (a fixed delay): Batcher's always_wait


@dataclass(eq=False)
class _Lease:
    conn: _Connection
    rid: int
    slots: list[int]
    task: asyncio.Task[None] | None = None
    queued: bool = False  # its images reached the batcher (which then counts their drops)
    on_the_way: int = 0  # images announced to the batcher (Batcher.expect), not yet settled


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    leases: dict[int, _Lease] = field(default_factory=dict)

    def send(self, message: wire.ToWorker) -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.encode(message))


class EngineServer:
    def __init__(self, config: EngineProcessConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        card = engine.card
        info = engine.info
        self.max_batch_size = max(info.batch_buckets)
        self.arena = SlotArena(
            config.shm_path,
            engine.sample_shape,
            engine.input_dtype,
            slot_count(config.max_queue_size, self.max_batch_size),
            create=True,
        )
        self._free: deque[int] = deque(range(self.arena.count))
        self.labels = {
            "model": card.name,
            "version": card.version,
            "provider": info.provider,
            "graph": info.graph,
            "opt_level": info.opt_level,
        }
        self.metrics = EngineMetrics(self.labels, self.max_batch_size, info.reason)
        self.metrics.restarts.inc()
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000,
            always_wait=config.batch_wait == "always",
            max_queue_size=self.arena.count,
            observer=self.metrics,
            # CUDA keeps its captured graphs on the batcher's thread: only the CPU runs inline.
            inline_below_s=INLINE_LONE_S if info.provider == "cpu" else 0.0,
        )
        self.connections: set[_Connection] = set()
        self.ready = False
        self.not_ready_reason = "warming up"
        self.fatal: str | None = None
        self.draining = False
        self.on_fatal: Callable[[], None] = lambda: None

    # ----------------------------------------------------------------- lifecycle

    def hello(self) -> wire.EngineHello:
        return wire.EngineHello(
            generation=self.config.generation,
            pid=os.getpid(),
            ready=self.ready,
            not_ready_reason=self.not_ready_reason,
            card=self.engine.card.model_dump(mode="json"),
            info=self.engine.info.describe(),
            metric_labels=self.labels,
            shm_path=str(self.arena.path),
            slot_shape=self.arena.shape,
            slot_dtype=self.arena.dtype.str,
            slots=self.arena.count,
            max_queue_size=self.config.max_queue_size,
            max_batch_size=self.max_batch_size,
        )

    def set_ready(self, ready: bool, reason: str) -> None:
        self.ready, self.not_ready_reason = ready, reason
        self.metrics.ready.set(1 if ready else 0)
        for conn in list(self.connections):
            conn.send(wire.StateChanged(ready, reason))

    async def warm_up(self) -> None:
        graphs_before = self.engine.info.cuda_graphs
        try:
            # On the batcher's own thread: the graphs captured now are the ones it replays.
            await self.batcher.call(self.engine.warm_up, self.config.warmup_rounds)
        except Exception as e:  # a model that cannot run must never report ready
            self.fatal = f"warm-up failed: {type(e).__name__}: {e}"
            log.exception("warm-up failed; the service will not become ready")
            self.set_ready(False, self.fatal)
            self.on_fatal()
            return
        if self.engine.info.cuda_graphs != graphs_before:
            # Warm-up rebuilt the session (a capture failed): workers hold the hello that
            # described the old one, so they reconnect and get the current one.
            log.warning(
                "engine rebuilt at warm-up", extra={"fallbacks": self.engine.info.fallbacks}
            )
            for conn in list(self.connections):
                conn.writer.close()
        gc.freeze()  # the session and what loading made stay; collections skip them
        if not self.draining:
            self.set_ready(True, "")
            log.info("ready", extra={"model": self.engine.card.name})

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.batcher.flush()
        log.info("draining", extra={"queued": self.batcher.depth, "workers": len(self.connections)})

    # ----------------------------------------------------------------- connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        self.connections.add(conn)
        conn.send(self.hello())
        try:
            while True:
                message = await wire.read_message(reader)
                self._dispatch(conn, message)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker went away (exit, crash or restart)
        except wire.ProtocolError as e:
            log.error("bad message from a worker; closing its connection", extra={"cause": str(e)})
        finally:
            self.connections.discard(conn)
            for lease in list(conn.leases.values()):
                self._release(lease, "cancelled")
            writer.close()

    def _dispatch(self, conn: _Connection, message: wire.Message) -> None:
        match message:
            case wire.Admit(rid, n):
                self._admit(conn, rid, n)
            case wire.Run(rid, slots, deadline):
                lease = conn.leases.get(rid)
                if lease is None:
                    conn.send(wire.Failed(rid, "internal_error", "run without a lease"))
                    return
                lease.task = asyncio.get_running_loop().create_task(
                    self._run(lease, list(slots), deadline)
                )
            case wire.Submit(rid, pixels, deadline):
                self._submit(conn, rid, pixels, deadline)
            case wire.Release(rid):
                lease = conn.leases.get(rid)
                if lease is not None:
                    self._release(lease, "cancelled")
            case wire.Ping(rid):  # the worker's heartbeat: this loop still answers
                conn.send(wire.Pong(rid))
            case _:
                raise wire.ProtocolError(f"unexpected message {type(message).__name__}")

    # ----------------------------------------------------------------- admission

    @property
    def held(self) -> int:
        """Slots leased: images decoding, queued or in the batch being run."""
        return self.arena.count - len(self._free)

    @property
    def waiting(self) -> int:
        """Images admitted and not in the batch being run: decoding, or queued."""
        return self.held - self.batcher.in_flight

    def retry_after_s(self) -> int:
        return self.batcher.retry_after_s()

    def _admit(self, conn: _Connection, rid: int, n: int) -> None:
        slots = self._grant(conn, rid, n)
        if slots is None:
            return
        conn.leases[rid] = _Lease(conn, rid, slots, on_the_way=n)
        # A batch that is not full waits (up to the delay) for these while they are decoded.
        self.batcher.expect(n)
        conn.send(wire.Granted(rid, tuple(slots)))

    def _submit(self, conn: _Connection, rid: int, pixels: np.ndarray, deadline: float) -> None:
        """Admit and run one image the worker has already preprocessed, in one message."""
        if pixels.shape != self.arena.shape or pixels.dtype != self.arena.dtype:
            conn.send(
                wire.Failed(
                    rid,
                    "internal_error",
                    f"submitted pixels {pixels.dtype}{list(pixels.shape)}, slots are "
                    f"{self.arena.dtype}{list(self.arena.shape)}",
                )
            )
            return
        slots = self._grant(conn, rid, 1)
        if slots is None:
            return
        self.arena.slot(slots[0])[...] = pixels
        lease = conn.leases[rid] = _Lease(conn, rid, slots)
        lease.task = asyncio.get_running_loop().create_task(self._run(lease, slots, deadline))

    def _grant(self, conn: _Connection, rid: int, n: int) -> list[int] | None:
        """``n`` free slots within the admission bound, or None once the refusal is sent."""
        if self.fatal is not None or not self.ready:
            why = self.fatal or f"the service is {self.not_ready_reason}"
            conn.send(wire.Failed(rid, "not_ready", why, 1))
            return None
        bound = self.config.max_queue_size
        if self.waiting + n > bound or n > len(self._free):
            self.metrics.on_dropped("queue_full", n)
            conn.send(
                wire.Failed(
                    rid,
                    "queue_full",
                    f"{self.waiting} images in progress; {n} more exceed "
                    f"SERESNET_MAX_QUEUE_SIZE={bound}",
                    self.retry_after_s(),
                )
            )
            return None
        slots = [self._free.popleft() for _ in range(n)]
        self.metrics.admitted.set(self.held)
        return slots

    def _release(self, lease: _Lease, reason: str) -> None:
        """The caller is gone: drop its queued images; free its slots once no batch reads
        them."""
        if lease.conn.leases.pop(lease.rid, None) is None:
            return
        self._settle(lease)
        if lease.task is not None and not lease.task.done():
            lease.task.cancel()  # once queued, the batcher purges its images and counts them
        if not lease.queued and lease.slots:
            self.metrics.on_dropped(reason, len(lease.slots))  # admitted, never queued
        asyncio.get_running_loop().create_task(self._free_after_batch(lease.slots))

    def _settle(self, lease: _Lease) -> None:
        """The lease's images are queued now or never: no batch waits for them any more."""
        if lease.on_the_way:
            self.batcher.settle(lease.on_the_way)
            lease.on_the_way = 0

    async def _free_after_batch(self, slots: list[int]) -> None:
        await self.batcher.current_batch_done()
        self._give_back(slots)

    def _give_back(self, slots: list[int]) -> None:
        self._free.extend(slots)
        self.metrics.admitted.set(self.held)

    # ----------------------------------------------------------------- running

    def _run_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.engine.run(images)

    async def _run(self, lease: _Lease, used: list[int], deadline: float) -> None:
        conn, rid = lease.conn, lease.rid
        self._settle(lease)  # before submit(), so a lone request is dispatched at once
        # Images that failed to decode never reach the queue; their slots go back now.
        keep = set(used) & set(lease.slots)
        self._free.extend(s for s in lease.slots if s not in keep)
        lease.slots = [s for s in used if s in keep]
        try:
            if not lease.slots:
                raise ValueError("nothing to run")
            views = [self.arena.slot(s) for s in lease.slots]
            # submit() queues the images before its first await; from then on the batcher
            # counts any that are dropped.
            lease.queued = True
            logits = await self.batcher.submit(views, deadline)
        except asyncio.CancelledError:
            return  # released: _release frees the slots
        except QueueFullError as e:
            reply: wire.ToWorker = wire.Failed(rid, "queue_full", str(e), e.retry_after_s)
        except DeadlineExceededError as e:
            reply = wire.Failed(rid, "deadline_exceeded", str(e))
        except BatcherClosedError as e:
            reply = wire.Failed(rid, "shutting_down", str(e), 1)
        except BatchFailedError as e:
            reply = wire.Failed(rid, "inference_failed", str(e))
        except Exception as e:  # a bug here must answer the caller, not hang it
            log.exception("run failed")
            reply = wire.Failed(rid, "internal_error", f"{type(e).__name__}")
        else:
            reply = wire.Done(rid, np.ascontiguousarray(logits, dtype=np.float32))
        if conn.leases.pop(rid, None) is not None:
            if isinstance(reply, wire.Done):
                # Every batch that read these slots has returned its rows: free them now.
                self._give_back(lease.slots)
            else:  # a batch being run may still read them
                asyncio.get_running_loop().create_task(self._free_after_batch(lease.slots))
        conn.send(reply)


# --------------------------------------------------------------------------- process


async def _serve(config: EngineProcessConfig, engine: Engine, pipe: Connection) -> int:
    server_state = EngineServer(config, engine)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server_state.on_fatal = stop.set
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches every process of the terminal's group; the supervisor decides when the
    # engine stops (after the workers have drained), so the engine ignores SIGINT.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    # SIGUSR1: the supervisor has begun shutting down; stop holding images for fuller batches.
    loop.add_signal_handler(signal.SIGUSR1, server_state.begin_drain)
    config.socket_path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(server_state.handle, path=str(config.socket_path))
    os.chmod(config.socket_path, 0o600)
    server_state.batcher.start()
    # Blocking pipe send is fine here: the supervisor reads it at once.
    pipe.send(("loaded", server_state.hello()))
    warm = loop.create_task(server_state.warm_up())
    try:
        await stop.wait()
    finally:
        server_state.begin_drain()
        server_state.set_ready(False, "shutting down")
        deadline = time.monotonic() + config.drain_timeout_s
        # Workers answer what they accepted, then exit; the engine stays until they have gone.
        while server_state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(warm, 1)
        await server_state.batcher.close(max(0.1, deadline - time.monotonic()))
        log.info(
            "drained",
            extra={
                "batches": server_state.batcher.stats.batches,
                "images_run": server_state.batcher.stats.images_run,
            },
        )
        server_state.arena.close()
        server_state.arena.unlink()
        config.socket_path.unlink(missing_ok=True)
    if server_state.fatal:
        with contextlib.suppress(OSError):
            pipe.send(("fatal", server_state.fatal))
        return EXIT_WARMUP_FAILED
    return 0


def main(config: EngineProcessConfig, pipe: Connection) -> None:
    """Entry point of the engine process (spawned by the supervisor)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(config.log_level, config.log_format, process="engine")
    try:
        engine = Engine.load(config.engine)
    except Exception as e:  # whatever stops a load is reported in one line
        pipe.send(("error", str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"))
        sys.exit(EXIT_LOAD_FAILED)
    # uvloop, as the workers run: its socket reads and writes cost the engine less per message.
    sys.exit(uvloop.run(_serve(config, engine, pipe)))
