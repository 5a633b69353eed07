"""The progress bar (images/s and ETA) and the notices printed beside it.

Paths are streamed, so the number of images is not known up front; a background thread counts
them with its own walk (names only, no reads) and hands the total to the bar when done, from
which point it shows an ETA. The bar is off when standard error is not a terminal or --quiet.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Collection, Sequence

from tqdm import tqdm

from client.discovery import iter_items
from client.shards import Shard


class Progress:
    def __init__(self, enabled: bool, quiet: bool) -> None:
        self.quiet = quiet
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        if enabled:
            self._bar = tqdm(
                unit="img", dynamic_ncols=True, smoothing=0.1, file=sys.stderr, mininterval=0.5
            )

    def count_in_background(
        self, paths: Sequence[str], done: Collection[str], shard: Shard | None = None
    ) -> None:
        """Start counting the images still to score; stdin lists (``@-``) cannot be read twice
        and are not counted (no ETA then)."""
        if self._bar is None or "@-" in paths:
            return
        threading.Thread(target=self._count, args=(list(paths), done, shard), daemon=True).start()

    def _count(self, paths: list[str], done: Collection[str], shard: Shard | None) -> None:
        total = 0
        try:
            for item in iter_items(paths):
                if self._stop.is_set():
                    return
                if item.path not in done and (shard is None or shard.holds(item.path)):
                    total += 1
        except OSError:
            return  # the scoring walk reports whatever went wrong here
        if self._bar is not None:
            self._bar.total = total

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def notice(self, message: str) -> None:
        """An informational line (suppressed by --quiet), kept clear of the bar."""
        if not self.quiet:
            self.warn(message)

    def warn(self, message: str) -> None:
        """A line the user must see, even with --quiet."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
