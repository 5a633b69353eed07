"""The protocol's messages, from the shipped descriptor set, in a descriptor pool of their own
(see :mod:`service.grpc` for why not protobuf's default pool). Imports no grpc.

``message("ModelInferRequest")`` is the class of ``inference.ModelInferRequest``; classes are
made once and cached. Their instances are ordinary protobuf messages (typed ``Any`` here: no
stubs are generated).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = Path(__file__).with_name("protocol.binpb")
PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"


@functools.cache
def pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    own = descriptor_pool.DescriptorPool()
    for file in files.file:
        own.Add(file)
    return own


@functools.cache
def message(name: str) -> Any:
    """The message class of ``inference.NAME``, or of a full name with a dot in it."""
    full = name if "." in name else f"{PACKAGE}.{name}"
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full))


def methods() -> dict[str, tuple[Any, Any]]:
    """Every method of the service: its request and response classes, by method name."""
    service = pool().FindServiceByName(SERVICE)
    return {
        m.name: (
            message_factory.GetMessageClass(m.input_type),
            message_factory.GetMessageClass(m.output_type),
        )
        for m in service.methods
    }
