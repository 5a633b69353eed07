"""``--shard I/N``: one of N processes (an Indexed Job's pods, say) scores its part of a job.

An image belongs to shard ``hash(path) mod N``: every process decides alone, from the path as
given, with no list to share, and a shard's images stay the same when other images are added or
removed, so ``--resume`` of one shard never meets another's images. Every row the shard writes
records it, and ``--resume`` refuses a file written by another shard (or by an unsharded run).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, path: str) -> bool:
        digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index


def parse_shard(text: str) -> Shard:
    """``I/N`` with 0 <= I < N; ValueError with a message for the user otherwise."""
    index, sep, count = text.strip().partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        raise ValueError(f"{text!r} is not I/N (e.g. 0/4: the first of four shards)") from None
    if not sep or shard.count < 1 or not 0 <= shard.index < shard.count:
        raise ValueError(f"{text!r}: I/N needs N >= 1 and 0 <= I < N (0/4 ... 3/4)")
    return shard
