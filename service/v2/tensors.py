"""Datatype names of the protocol and the wire format of its BYTES tensors.

In the binary tensor data extension a BYTES tensor is its elements in row-major order, each
a 4-byte little-endian length followed by that many bytes; fixed-size datatypes are their
little-endian values back to back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

from service.v2.errors import BinaryDataError

BYTES = "BYTES"

# Fixed-size datatypes; BYTES has no fixed element size and is handled apart.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# BF16 has no numpy dtype, but it is a datatype of the protocol (2 bytes an element).
KNOWN_DATATYPES = frozenset([*NUMPY_DTYPES, "BF16", BYTES])

_LENGTH = struct.Struct("<I")


def datatype_of_card_dtype(dtype: str) -> str:
    """The protocol's name for a model card's input dtype (``uint8`` or ``float32``)."""
    return {"uint8": "UINT8", "float32": "FP32"}[dtype]


def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """The binary form of a BYTES tensor whose elements are ``items`` (row-major)."""
    parts: list[bytes] = []
    for item in items:
        parts.append(_LENGTH.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def deserialize_bytes(
    buffer: bytes | memoryview, name: str, max_items: int | None = None
) -> list[bytes]:
    """The elements of a binary BYTES tensor; ``name`` only labels the error when the
    length prefixes do not tile ``buffer`` exactly, or when there are more than ``max_items``
    (checked as they are read: 32 MB of empty elements is 8 M of them)."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if max_items is not None and len(items) >= max_items:
            raise BinaryDataError(
                f"input {name!r}: BYTES data holds more than the {max_items} element(s) its "
                "shape declares"
            )
        if offset + _LENGTH.size > len(view):
            raise BinaryDataError(
                f"input {name!r}: BYTES data ends inside an element's 4-byte length prefix "
                f"(at byte {offset} of {len(view)})"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise BinaryDataError(
                f"input {name!r}: BYTES element {len(items)} declares {length} bytes but only "
                f"{len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items
