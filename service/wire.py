"""The engine protocol: how ingress workers talk to the engine process.

One Unix stream socket per worker. Each message is a 4-byte big-endian length and a pickled
tuple whose first item names it. Pixel data never travels here: a worker writes preprocessed
images into shared-memory slots (:mod:`service.slots`) and sends only slot numbers; results
come back as small arrays (top-k or logits).

worker -> engine
    ("admit", rid, n)                     reserve n slots (the global admission bound)
    ("run", rid, slots, deadline, want)   run these slots; want = ("topk", k) or ("logits",)
    ("release", rid)                      the caller is gone: drop its images, free its slots
    ("ping", rid)                         heartbeat: is the engine's loop answering?

engine -> worker
    ("hello", EngineHello)                on connect
    ("state", ready, reason)              readiness changed
    ("lease", rid, slots)                 admit granted
    ("done", rid, payload)                (indices int32 [n,k], probs float32 [n,k]) or logits
    ("fail", rid, code, message, retry_after_s | None)
    ("pong", rid, None)                   heartbeat answered
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

_HEADER = struct.Struct(">I")
# Control messages are small (slot lists, top-k rows, logits of a batch); anything near this
# is a bug or a corrupted stream, never a legitimate message.
MAX_MESSAGE_BYTES = 64 * 2**20

Message = tuple[Any, ...]


class ProtocolError(RuntimeError):
    """The peer sent something that is not a message of this protocol."""


@dataclass(frozen=True)
class EngineHello:
    """What a worker learns about the engine when it connects."""

    generation: int  # changes whenever the engine process is restarted
    pid: int
    ready: bool
    not_ready_reason: str
    card: dict[str, Any]  # model.json as JSON
    info: dict[str, Any]  # EngineInfo.describe(): provider, graph, reasons, buckets...
    metric_labels: dict[str, str]
    shm_path: str
    slot_shape: tuple[int, ...]
    slot_dtype: str
    slots: int
    max_queue_size: int
    max_batch_size: int


def encode(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Message:
    """The next message; raises ``asyncio.IncompleteReadError`` at EOF."""
    header = await reader.readexactly(_HEADER.size)
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes announced")
    message = pickle.loads(await reader.readexactly(size))
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        raise ProtocolError(f"not a message: {type(message).__name__}")
    return message
