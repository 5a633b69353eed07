"""Memory budgets of one ingress worker: request-body bytes held at once, and the memory that
concurrent decodes may use. Both refuse instead of letting a burst of uploads or a few tiny
files that decode huge take the process's memory."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class BudgetExceededError(Exception):
    """The request cannot get the bytes it needs now (``fits_at_all`` says whether it ever
    could)."""

    def __init__(self, needed: int, limit: int, fits_at_all: bool) -> None:
        super().__init__(needed, limit)
        self.needed = needed
        self.limit = limit
        self.fits_at_all = fits_at_all


class ByteBudget:
    """Body bytes in flight on one worker's event loop (single-threaded: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        """Account ``n`` more bytes or raise BudgetExceededError (503: retry later)."""
        if self.used + n > self.limit:
            raise BudgetExceededError(n, self.limit, n <= self.limit)
        self.used += n

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


class DecodeBudget:
    """Estimated bytes of decodes running at once in the worker's decode threads.

    A decode that can never fit (its estimate exceeds the whole budget) is refused at once; one
    that fits waits until enough earlier decodes have finished, up to its deadline."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, deadline: float) -> Iterator[None]:
        if nbytes > self.limit:
            raise BudgetExceededError(nbytes, self.limit, False)
        with self._cond:
            while self.used + nbytes > self.limit:
                left = deadline - time.monotonic()
                timed_out = left <= 0 or not self._cond.wait(left)
                if timed_out and self.used + nbytes > self.limit:
                    raise BudgetExceededError(nbytes, self.limit, True)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()
