"""Read a ``/classify`` body into image uploads, enforcing the limits while it streams.

FastAPI does not enforce a body size limit, and Starlette's form parser decodes file parts
without a filename as text, so the body is read here: the byte limit is checked on every chunk
(and up front from ``Content-Length``), multipart is parsed incrementally with
python-multipart's streaming parser, and the part count limit stops a flood of parts early.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ServiceError

if TYPE_CHECKING:  # a typing-only name in python-multipart
    from python_multipart.multipart import MultipartCallbacks

IMAGE_FIELD = "images"
RAW_TYPES = ("application/octet-stream",)


class BodyError(ServiceError):
    """The request as a whole is unusable."""


@dataclass
class Upload:
    """One image as it arrived: its name for the results, and its bytes."""

    filename: str
    data: bytes


def _too_large(limit: int) -> BodyError:
    return BodyError(
        413, "body_too_large", f"request body exceeds {limit} bytes (SERESNET_MAX_BODY_BYTES)"
    )


def _too_many(limit: int) -> BodyError:
    return BodyError(
        413,
        "too_many_images",
        f"more than {limit} parts in one request (SERESNET_MAX_IMAGES_PER_REQUEST)",
    )


def media_type(headers: Mapping[str, str]) -> tuple[str, dict[bytes, bytes]]:
    value, params = parse_options_header(headers.get("content-type", ""))
    return value.decode("latin-1").strip().lower(), params


def check_declared_length(headers: Mapping[str, str], limit: int) -> int | None:
    """Reject from ``Content-Length`` before reading anything; None when it is absent."""
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        length = int(raw)
    except ValueError:
        raise BodyError(400, "invalid_request", f"Content-Length {raw!r} is not a number") from None
    if length > limit:
        raise _too_large(limit)
    return length


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, failing as soon as it grows past ``limit`` bytes."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


class _MultipartCollector:
    """Callbacks for python-multipart: keeps ``images`` parts, counts every part."""

    def __init__(self, max_parts: int) -> None:
        self.max_parts = max_parts
        self.parts = 0
        self.uploads: list[Upload] = []
        self.other_names: set[str] = set()
        self.finished = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._data: bytearray | None = None
        self._name = ""
        self._filename = ""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise _too_many(self.max_parts)
        self._headers = {}
        self._data = None

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        self._filename = params.get(b"filename", b"").decode("utf-8", "replace")
        if self._name == IMAGE_FIELD:
            self._data = bytearray()
        else:
            self.other_names.add(self._name)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            self._data += data[start:end]

    def _part_end(self) -> None:
        if self._data is not None:
            name = self._filename or f"{IMAGE_FIELD}[{len(self.uploads)}]"
            self.uploads.append(Upload(name, bytes(self._data)))
        self._data = None

    def _end(self) -> None:
        self.finished = True


async def read_multipart(
    chunks: AsyncIterator[bytes], boundary: bytes, max_body: int, max_parts: int
) -> list[Upload]:
    """Parse as it streams; the byte and part limits stop reading early."""
    collector = _MultipartCollector(max_parts)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except ValueError as e:
        raise BodyError(400, "invalid_multipart", f"bad multipart boundary: {e}") from None
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        try:
            parser.write(chunk)
        except BodyError:
            raise
        except Exception as e:  # python-multipart signals malformed input with several types
            raise BodyError(400, "invalid_multipart", f"malformed multipart body: {e}") from None
    if size == 0:
        raise BodyError(400, "no_image", "the request body is empty")
    if not collector.finished:
        raise BodyError(400, "invalid_multipart", "multipart body ends before its closing boundary")
    if not collector.uploads:
        others = ", ".join(repr(n) for n in sorted(collector.other_names)) or "none"
        raise BodyError(400, "no_image", f"no part named {IMAGE_FIELD!r} (parts found: {others})")
    return collector.uploads


async def read_uploads(
    headers: Mapping[str, str], chunks: AsyncIterator[bytes], max_body: int, max_images: int
) -> list[Upload]:
    """The images of a ``/classify`` request: multipart parts named ``images``, or the raw body
    (``image/*`` or ``application/octet-stream``). Raises :class:`BodyError`."""
    declared = check_declared_length(headers, max_body)
    if declared == 0:
        raise BodyError(400, "no_image", "the request body is empty")
    kind, params = media_type(headers)
    if kind == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise BodyError(400, "invalid_multipart", "multipart/form-data without a boundary")
        return await read_multipart(chunks, boundary, max_body, max_images)
    if kind.startswith("image/") or kind in RAW_TYPES:
        data = await read_limited(chunks, max_body)
        if not data:
            raise BodyError(400, "no_image", "the request body is empty")
        _, disp = parse_options_header(headers.get("content-disposition", ""))
        return [Upload(disp.get(b"filename", b"body").decode("utf-8", "replace"), data)]
    if not kind:
        data = await read_limited(chunks, max_body)
        if not data:
            raise BodyError(400, "no_image", "the request body is empty")
    shown = kind or "none"
    raise BodyError(
        415,
        "unsupported_media_type",
        f"Content-Type {shown!r} is not accepted: send multipart/form-data with "
        f"parts named {IMAGE_FIELD!r}, or one image as the body with an image/* type",
    )
