"""``python -m service``'s own process: it starts the engine process, binds the port, runs the
ingress workers under uvicorn's multiprocess supervisor, and keeps all of them alive.

::

    supervisor ── engine process   (ONNX Runtime session, batcher, shared-memory slots)
               ├─ ingress worker 1 (HTTP, limits, decode, preprocess) ─┐  Unix socket +
               ├─ ...                                                  ├─ shared memory
               └─ ingress worker N ────────────────────────────────────┘  to the engine

A worker that dies is replaced by uvicorn's supervisor. An engine that dies is restarted here;
meanwhile the workers answer 503 and report not ready. SIGTERM with a shutdown delay first
reports not ready on every worker and keeps serving for the delay. Then (or at once: Ctrl-C,
no delay, a second SIGTERM) the drain: the engine stops
holding images for fuller batches, the workers finish what they accepted and exit, then the
engine runs what is left and exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess

from service import metrics
from service.engine.config import EXIT_WARMUP_FAILED, EngineConfig
from service.grpc import port as grpc_port
from service.settings import Settings
from service.slots import arena_bytes, choose_path, make_run_dir, slot_count
from service.wire import ENGINE_SOCKET_ENV, LEAVING_MARKER

log = logging.getLogger("service")

_spawn = multiprocessing.get_context("spawn")
ENGINE_LOAD_TIMEOUT_S = 900.0  # a large model with an exhaustive cuDNN search loads slowly
ENGINE_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class StartupError(RuntimeError):
    """The service cannot start; the message is the one line to print."""


def _engine_main(config: object, pipe: Connection) -> None:
    # A trampoline, so that the supervisor never imports onnxruntime itself.
    from service.engine.server import main

    main(config, pipe)  # type: ignore[arg-type]


def _slot_bytes(model_dir: Path, slots: int) -> int:
    from modelcard.schema import CardError, read_card

    try:
        spec = read_card(model_dir).input
    except CardError as e:
        raise StartupError(str(e)) from None
    return arena_bytes(spec.shape, spec.dtype, slots)


def _drain_pipe(pipe: Connection) -> list[tuple[str, object]]:
    """Every message waiting on the engine's pipe (none once it is closed)."""
    out = []
    try:
        while pipe.poll(0):
            out.append(pipe.recv())
    except (EOFError, OSError):
        pass
    return out


@dataclass
class _EngineHandle:
    process: SpawnProcess
    pipe: Connection
    shm_path: Path
    generation: int
    started: float


class EngineSupervisor:
    """Starts, watches and restarts the engine process."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.socket_path = run_dir / "engine.sock"
        self.engine_config: EngineConfig = settings.engine_config()
        self.handle: _EngineHandle | None = None
        self.generation = 0
        self.fatal: str | None = None
        self._failures = 0
        self._restart_at: float | None = None
        self._slots_bytes = 0

    def _spawn(self) -> _EngineHandle:
        from service.engine.server import EngineProcessConfig  # dataclass only; no ORT import

        self.generation += 1
        shm_path = choose_path(f"{os.getpid()}-{self.generation}", self._slots_bytes, self.run_dir)
        s = self.settings
        config = EngineProcessConfig(
            engine=self.engine_config,
            socket_path=self.socket_path,
            shm_path=shm_path,
            generation=self.generation,
            max_queue_size=s.max_queue_size,
            max_queue_delay_ms=s.max_queue_delay_ms,
            batch_wait=s.batch_wait,
            warmup_rounds=s.warmup_rounds,
            drain_timeout_s=s.drain_timeout_s,
            log_level=s.log_level,
            log_format=s.log_format,
        )
        parent, child = _spawn.Pipe(duplex=False)
        process = _spawn.Process(
            target=_engine_main, args=(config, child), name="engine", daemon=False
        )
        process.start()
        child.close()
        return _EngineHandle(process, parent, shm_path, self.generation, time.monotonic())

    def start(self) -> None:
        """Start the engine and wait until its model is loaded (not yet warm); raises
        StartupError with the engine's own one-line reason if it cannot load."""
        s = self.settings
        self._slots_bytes = _slot_bytes(s.model_dir, slot_count(s.max_queue_size, s.max_batch_size))
        handle = self.handle = self._spawn()
        deadline = time.monotonic() + ENGINE_LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if handle.pipe.poll(0.05):
                try:
                    kind, payload = handle.pipe.recv()
                except EOFError:
                    break
                if kind == "loaded":
                    return
                if kind == "error":
                    handle.process.join(10)
                    raise StartupError(str(payload))
            if not handle.process.is_alive():
                break
        handle.process.join(1)
        raise StartupError(
            f"the engine process exited during start-up (exit code "
            f"{handle.process.exitcode}); its log lines above say why"
        )

    def begin_drain(self) -> None:
        """Tell the engine that shutdown has begun: run queued images now."""
        if self.handle is not None and self.handle.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.handle.process.pid or 0, signal.SIGUSR1)

    def keep_alive(self) -> bool:
        """Called from the supervisor's loop; returns False when the service must stop."""
        handle = self.handle
        if handle is None:
            if self._restart_at is not None and time.monotonic() >= self._restart_at:
                self._restart_at = None
                self.handle = self._spawn()
                log.info(
                    "engine restarted",
                    extra={"engine_pid": self.handle.process.pid, "generation": self.generation},
                )
            return True
        for kind, payload in _drain_pipe(handle.pipe):
            if kind in ("fatal", "error"):
                self.fatal = str(payload)
        if handle.process.is_alive():
            return True
        code = handle.process.exitcode
        handle.process.join()
        metrics.mark_process_dead(handle.process.pid or 0)
        handle.shm_path.unlink(missing_ok=True)
        self.handle = None
        if time.monotonic() - handle.started > 60:
            self._failures = 0  # it served a while: a new crash starts the back-off afresh
        if self.fatal is not None or code == EXIT_WARMUP_FAILED:
            self.fatal = self.fatal or "the engine's warm-up failed"
            log.error("engine cannot serve; stopping", extra={"cause": self.fatal})
            return False
        delay = ENGINE_RESTART_BACKOFF_S[min(self._failures, len(ENGINE_RESTART_BACKOFF_S) - 1)]
        self._failures += 1
        self._restart_at = time.monotonic() + delay
        log.error(
            "engine process died; restarting it",
            extra={"exit_code": code, "restart_in_s": delay, "generation": handle.generation},
        )
        return True

    def stop(self, timeout_s: float) -> None:
        handle, self.handle = self.handle, None
        if handle is None:
            return
        if handle.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.process.pid or 0, signal.SIGTERM)
            handle.process.join(timeout_s)
            if handle.process.is_alive():
                log.error("engine did not stop in time; killing it")
                handle.process.kill()
                handle.process.join(5)
        for kind, payload in _drain_pipe(handle.pipe):
            if kind == "fatal":
                self.fatal = str(payload)
        handle.shm_path.unlink(missing_ok=True)


class WorkerSupervisor(Multiprocess):
    """uvicorn's multiprocess supervisor, which also keeps the engine alive and cleans up
    after a worker it replaces."""

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        engine: EngineSupervisor,
        shutdown_delay_s: float = 0.0,
    ) -> None:
        super().__init__(config, sockets)
        self.engine = engine
        self.shutdown_delay_s = shutdown_delay_s
        self._drain_at: float | None = None

    def keep_subprocess_alive(self) -> None:
        if self._drain_at is not None and time.monotonic() >= self._drain_at:
            self._drain("shutdown delay over")
            return
        before = {p.pid for p in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {p.pid for p in self.processes}:
            metrics.mark_process_dead(pid or 0)
            log.warning("ingress worker died and was replaced", extra={"worker_pid": pid})
        if not self.should_exit.is_set() and not self.engine.keep_alive():
            self.should_exit.set()

    def _drain(self, cause: str) -> None:
        log.info("shutting down", extra={"cause": cause})
        self._drain_at = None
        self.engine.begin_drain()
        self.should_exit.set()

    def handle_term(self) -> None:
        # A balancer learns of a leaving replica only at its next readiness check: report not
        # ready now and keep serving through the delay, so no new connection meets a closed
        # socket. A second SIGTERM (or Ctrl-C) cuts the delay short.
        if self.shutdown_delay_s > 0 and self._drain_at is None and not self.should_exit.is_set():
            (self.engine.run_dir / LEAVING_MARKER).touch()
            self._drain_at = time.monotonic() + self.shutdown_delay_s
            log.info(
                "leaving: not ready, still serving until the shutdown delay is over",
                extra={"signal": "SIGTERM", "shutdown_delay_s": self.shutdown_delay_s},
            )
            return
        self._drain("SIGTERM")

    def handle_int(self) -> None:
        self._drain("SIGINT")


def raise_open_file_limit() -> None:
    """Every connection is a file descriptor: take the hard limit, not the (often 1024) soft
    one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        "service.ingress.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.worker_count(),
        http="service.ingress.http_protocol:GuardedHttpToolsProtocol",
        loop="uvloop",
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        timeout_keep_alive=max(1, round(settings.keepalive_timeout_s)),
        # uvicorn kills a worker that misses a 5 s ping and with it every request it holds; a
        # worker starved of CPU (a loaded box, a long decode) is slow, not hung.
        timeout_worker_healthcheck=30,
    )


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; the exit code (1: it could not serve)."""
    raise_open_file_limit()
    run_dir = make_run_dir()
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    os.environ[metrics.MULTIPROC_ENV] = str(metrics_dir)
    engine = EngineSupervisor(settings, run_dir)
    os.environ[ENGINE_SOCKET_ENV] = str(engine.socket_path)
    try:
        try:
            engine.start()
        except StartupError as e:
            print(f"error: {e}", flush=True, file=sys.stderr)
            return 1
        config = uvicorn_config(settings)
        try:
            sock = config.bind_socket()
        except SystemExit:
            engine.stop(5)
            return 1
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        grpc_hold = None
        if settings.grpc_port:
            try:
                grpc_hold = grpc_port.reserve(settings.host, settings.grpc_port)
            except OSError as e:
                print(
                    f"error: cannot bind the gRPC port {settings.grpc_port} "
                    f"(SERESNET_GRPC_PORT; 0 turns gRPC off): {e.strerror or e}",
                    flush=True,
                    file=sys.stderr,
                )
                sock.close()
                engine.stop(5)
                return 1
        log.info(
            "listening",
            extra={
                "url": f"http://{shown}:{port}",
                "grpc": grpc_port.target(shown.strip("[]"), settings.grpc_port)
                if settings.grpc_port
                else None,
                "workers": config.workers,
                "engine_pid": engine.handle.process.pid if engine.handle else None,
            },
        )
        supervisor = WorkerSupervisor(config, [sock], engine, settings.shutdown_delay_s)
        supervisor.run()
        t0 = time.monotonic()
        log.info("workers stopped; stopping the engine")
        engine.stop(settings.drain_timeout_s + 5)
        log.info("engine stopped", extra={"seconds": round(time.monotonic() - t0, 3)})
        sock.close()
        if grpc_hold is not None:
            grpc_hold.close()
        if engine.fatal:
            print(f"error: {engine.fatal}", flush=True, file=sys.stderr)
            return 1
        log.info("stopped")
        return 0
    finally:
        engine.stop(5)
        shutil.rmtree(run_dir, ignore_errors=True)
