"""What one ingress worker holds for its lifetime: settings, the engine connection, the decode
threads, the memory budgets, metrics and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelcard.schema import ModelCard
from service import wire
from service.ingress.budget import ByteBudget, DecodeBudget
from service.ingress.engine_client import EngineClient
from service.ingress.errors import ApiError
from service.ingress.imaging import configure_decoding
from service.metrics import IngressMetrics, http_metrics
from service.settings import Settings

log = logging.getLogger("service.ingress")

ENGINE_SOCKET_ENV = wire.ENGINE_SOCKET_ENV  # set by the supervisor for its workers
LEAVING_MARKER = wire.LEAVING_MARKER


class IngressState:
    def __init__(self, settings: Settings, engine_socket: Path) -> None:
        self.settings = settings
        self.engine = EngineClient(engine_socket, on_hello=self._on_hello)
        self.pool = ThreadPoolExecutor(
            settings.preprocess_workers(), thread_name_prefix="preprocess"
        )
        self.body_budget = ByteBudget(settings.inflight_body_bytes())
        self.decode_budget = DecodeBudget(settings.decode_memory_mb * 2**20)
        self.http_metrics = http_metrics()
        self.extensions: list[str] = []  # KServe V2 extensions the routes implement
        self.metrics: IngressMetrics | None = None
        self.card: ModelCard | None = None
        self.draining = False
        self._leaving = engine_socket.parent / LEAVING_MARKER
        self._labels: dict[str, str] | None = None

    def _on_hello(self, hello: wire.EngineHello) -> None:
        if hello.metric_labels != self._labels:
            self._labels = dict(hello.metric_labels)
            self.metrics = IngressMetrics(self._labels)
        card = ModelCard.model_validate(hello.card)
        # The one place the card enters a worker: a configured name (a KServe
        # InferenceService's, which KServe puts in every /v2/models/NAME URL) replaces the
        # card's for every route.
        if self.settings.model_name:
            card = card.model_copy(update={"name": self.settings.model_name})
        self.card = card

    async def start(self) -> None:
        configure_decoding()
        self.engine.start()
        # The supervisor started the engine before the workers; a short wait lets the first
        # requests find it connected. Readiness says the rest.
        await self.engine.wait_connected(5.0)

    async def stop(self) -> None:
        self.draining = True
        await self.engine.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.pool.shutdown, wait=True)

    # ----------------------------------------------------------------- readiness

    @property
    def leaving(self) -> bool:
        """Shutting down: draining, or inside the shutdown delay (still serving)."""
        return self.draining or self._leaving.exists()

    @property
    def ready(self) -> bool:
        return self.engine.connected and self.engine.ready and not self.leaving

    def check_ready(self) -> None:
        """Readiness (health and model-ready routes): false from the first SIGTERM on."""
        self._raise_unless(self.ready)

    def check_serving(self) -> None:
        """Whether work is taken: through the shutdown delay too, until the drain begins."""
        self._raise_unless(self.engine.connected and self.engine.ready and not self.draining)

    def _raise_unless(self, ok: bool) -> None:
        if ok:
            return
        if self.leaving:
            why = "shutting down"
        elif not self.engine.connected:
            why = "waiting for the engine process (starting or restarting)"
        else:
            why = self.engine.not_ready_reason or "warming up"
        retry = "60" if why.startswith("warm-up failed") else "1"
        raise ApiError(503, "not_ready", f"the service is {why}", {"Retry-After": retry})

    def processes(self) -> dict[str, object]:
        hello = self.engine.hello
        return {
            "workers": self.settings.worker_count(),
            "worker_pid": os.getpid(),
            "decode_threads_per_worker": self.settings.preprocess_workers(),
            "engine_pid": hello.pid if hello else None,
            "engine_generation": hello.generation if hello else None,
            "engine_connected": self.engine.connected,
        }
