"""Several ``--url``s: the job spread over replicas without a balancer.

Each replica has its own :class:`~client.scoring.Scorer` (its own keep-alive pool, retries and
back-off). Batches go round-robin to the replicas that are up. A replica that fails readiness
at the start is skipped (and taken in later if it turns ready); a batch whose request failed on
one replica after its retries is sent to the next one, and the failing replica rests a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from client.output import Row
from client.scoring import Image, Scorer, ServiceError, Settings

REST_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # how long a failing replica gets no batches, by streak


@dataclass
class _Replica:
    url: str
    scorer: Scorer
    up: bool = False
    resting_until: float = 0.0
    strikes: int = 0


class Replicas:
    """The scoring interface of :class:`Scorer` (``score``, ``model``, ``failure_streak``,
    ``class_labels``) over one or more replicas."""

    def __init__(self, replicas: list[_Replica], notify: Callable[[str], None]) -> None:
        self._replicas = replicas
        self._notify = notify
        self._turn = itertools.count()
        self._background: list[asyncio.Task[None]] = []
        self.failure_streak = 0
        self.last_failure = ""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        urls: list[str],
        notify: Callable[[str], None],
        on_model: Callable[[str, str, int], None],
    ) -> AsyncIterator[Replicas]:
        async with contextlib.AsyncExitStack() as stack:
            replicas = []
            for url in urls:
                own = replace(settings, url=url)
                client = await stack.enter_async_context(Scorer.make_client(own))
                replicas.append(_Replica(url, Scorer(own, client, notify, on_model)))
            group = cls(replicas, notify)
            try:
                yield group
            finally:
                for task in group._background:
                    task.cancel()

    @property
    def model(self) -> str | None:
        return next((r.scorer.model for r in self._replicas if r.scorer.model), None)

    async def wait_ready(self) -> None:
        """Return once one replica is ready; the others join as they turn ready, and one that
        cannot (unreachable, an error) is skipped with a notice. Raises :class:`ServiceError`
        when none can serve."""
        if len(self._replicas) == 1:
            await self._replicas[0].scorer.wait_ready()
            self._replicas[0].up = True
            return
        first_ready = asyncio.Event()
        failures: list[ServiceError] = []

        async def probe(replica: _Replica) -> None:
            try:
                await replica.scorer.wait_ready()
            except ServiceError as e:
                failures.append(e)
                self._notify(f"skipping {replica.url}: {e}")
                if len(failures) == len(self._replicas):
                    first_ready.set()
                return
            replica.up = True
            first_ready.set()

        self._background = [asyncio.create_task(probe(r)) for r in self._replicas]
        await first_ready.wait()
        if not any(r.up for r in self._replicas):
            raise ServiceError(f"no replica can serve: {failures[0]}")
        for replica, task in zip(self._replicas, self._background, strict=True):
            if not task.done():
                self._notify(f"skipping {replica.url} for now: not ready (it joins once it is)")

    async def class_labels(self, model: str | None = None) -> list[str]:
        for replica in self._choices():
            labels = await replica.scorer.class_labels(model)
            if labels:
                return labels
        return []

    def _choices(self) -> list[_Replica]:
        """The replicas to try for one batch: those up and rested, starting at the next in
        turn; all that are up when every one is resting."""
        up = [r for r in self._replicas if r.up]
        now = time.monotonic()
        rested = [r for r in up if r.resting_until <= now] or up
        start = next(self._turn) % len(rested)
        return rested[start:] + rested[:start]

    async def score(self, images: list[Image]) -> list[Row]:
        rows: list[Row] = []
        for replica in self._choices():
            rows = await replica.scorer.score(images)
            failed = bool(rows) and all(r.get("error", {}).get("scope") == "request" for r in rows)
            if not failed:
                replica.strikes = 0
                self.failure_streak = 0
                return rows
            replica.resting_until = time.monotonic() + REST_S[min(replica.strikes, 4)]
            replica.strikes += 1
            self.last_failure = f"{replica.url}: {replica.scorer.last_failure}"
            if len(self._replicas) > 1:
                self._notify(f"{replica.url} failed a request; sending it to the next replica")
        self.failure_streak += 1
        return rows
