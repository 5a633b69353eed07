"""The engine protocol: how ingress workers talk to the engine process.

One Unix stream socket per worker (the supervisor names its path in :data:`ENGINE_SOCKET_ENV`
for the workers). Each message is a 4-byte big-endian length and a pickled frozen dataclass of
this module. Pixel data never travels here: a worker writes preprocessed images into
shared-memory slots (:mod:`service.slots`) and sends only slot numbers; the engine answers
with the logits of the images it ran (the worker ranks them, :mod:`service.ranking`). The one
exception is a lone small image the worker decoded on its event loop: its pixels (at most
:data:`MAX_SUBMIT_BYTES`) come in one Submit, which saves the Admit round trip.

worker -> engine
    Admit(rid, n)                 reserve n slots (the global admission bound)
    Run(rid, slots, deadline)     run these slots
    Submit(rid, pixels, deadline) admit one preprocessed image, copy it into a slot, run it
    Release(rid)                  the caller is gone: drop its images, free its slots
    Ping(rid)                     heartbeat: is the engine's event loop answering?

engine -> worker
    EngineHello                   on connect
    StateChanged(ready, reason)   readiness changed
    Granted(rid, slots)           admit granted
    Done(rid, logits)             float32 [len(slots), classes]
    Failed(rid, code, message, retry_after_s | None)
    Pong(rid)                     heartbeat answered
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

ENGINE_SOCKET_ENV = "SERESNET_ENGINE_SOCKET"  # set by the supervisor for its workers

_HEADER = struct.Struct(">I")
# Control messages are small (slot lists, logits of a batch); anything near this is a bug or
# a corrupted stream, never a legitimate message.
MAX_MESSAGE_BYTES = 64 * 2**20
# Pixels sent in a Submit: a 3x224x224 uint8 image fits; a float32 one goes through a slot.
MAX_SUBMIT_BYTES = 256 * 2**10


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


def _rebuilt(
    cls: type[Any], rid: int, data: bytes, dtype: str, shape: tuple[int, ...], *rest: Any
) -> Any:
    return cls(rid, np.frombuffer(data, dtype=dtype).reshape(shape), *rest)


class _ArrayMessage:
    """A message of a rid, one array and what follows: pickled as the array's raw bytes,
    dtype and shape, a quarter of what pickling the ndarray costs each way (read-only once
    unpickled)."""

    def __reduce__(self) -> tuple[Any, ...]:
        rid, array, *rest = (getattr(self, f) for f in self.__dataclass_fields__)  # type: ignore[attr-defined]
        return (_rebuilt, (type(self), rid, array.tobytes(), array.dtype.str, array.shape, *rest))


@dataclass(frozen=True)
class Admit:
    rid: int
    n: int


@dataclass(frozen=True)
class Run:
    rid: int
    slots: tuple[int, ...]
    deadline: float  # time.monotonic() of the deadline (one clock for every process)


@dataclass(frozen=True)
class Submit(_ArrayMessage):
    rid: int
    pixels: np.ndarray  # one image, the slots' shape and dtype
    deadline: float


@dataclass(frozen=True)
class Release:
    rid: int


@dataclass(frozen=True)
class Ping:
    rid: int


@dataclass(frozen=True)
class StateChanged:
    ready: bool
    reason: str


@dataclass(frozen=True)
class Granted:
    rid: int
    slots: tuple[int, ...]


@dataclass(frozen=True)
class Done(_ArrayMessage):
    rid: int
    logits: np.ndarray


@dataclass(frozen=True)
class Failed:
    rid: int
    code: str  # a code of service.errors.CODES
    message: str
    retry_after_s: int | None = None


@dataclass(frozen=True)
class Pong:
    rid: int


ToEngine = Admit | Run | Submit | Release | Ping
ToWorker = EngineHello | StateChanged | Granted | Done | Failed | Pong
Message = ToEngine | ToWorker
_MESSAGE_TYPES = (
    Admit,
    Run,
    Submit,
    Release,
    Ping,
    EngineHello,
    StateChanged,
    Granted,
    Done,
    Failed,
    Pong,
)


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
    if not isinstance(message, _MESSAGE_TYPES):
        raise ProtocolError(f"not a message: {type(message).__name__}")
    return message


# Beside the engine socket: the supervisor creates it when SIGTERM starts the shutdown delay,
# so every worker reports not ready while it still serves.
LEAVING_MARKER = "leaving"
