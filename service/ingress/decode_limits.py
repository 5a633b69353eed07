"""What a file's structure says its decode will cost, read before Pillow parses anything, and a
reader that stops a decode once its request is gone or past its deadline.

Pillow's time and memory follow a file's structure, not its size on disk: a progressive JPEG
makes a full pass over every block per scan, a BMP's RLE end-of-line pads each row one byte per
Python loop turn, a TIFF's strip table becomes one Python tuple per strip at open, a GIF
extension becomes one bytes object per sub-block. Real files stay far below the caps here (a
progressive JPEG has about ten scans, a TIFF a strip per few KB of pixels, a GIF comment a few
sub-blocks); the bombs are thousands to millions of times over them.

Pillow decodes by reading its file in blocks, so a file object that checks a stop condition on
every read ends a runaway decode within one block's work (tens of milliseconds; blocks are kept
small for that). Of the ways to stop a runaway decode this one was measured cheapest (the
numbers are in docs/design.md, section 7): a process per decode costs a fork and a copy of the
result per image and still needs these caps for memory; the caps alone leave a decode running
after its request has given up.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

from service.errors import ServiceError

# Progressive JPEG: libjpeg-turbo's own guidance for untrusted input is at most 100 scans.
MAX_JPEG_SCANS = 100
# RLE BMPs are decoded by a pure-Python loop (about 0.17 us per pixel here): 4 Mpx is 0.7 s.
MAX_BMP_RLE_PIXELS = 4_000_000
# TIFF strips/tiles: one Python tuple each at open (a 40 Mpx image at 8 KB strips has ~15 k).
MAX_TIFF_BLOCKS = 65_536
# GIF extension sub-blocks before the first image (a 1 MB comment is 4 k full sub-blocks).
MAX_GIF_SUBBLOCKS = 16_384
# Bytes a decoder is handed per read: one check of the stop condition per this many.
READ_BLOCK = 16 * 1024


class StructureError(ServiceError):
    """The file's structure costs more than any real image of its kind (400 corrupt_image)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, "corrupt_image", message)


class DecodeStoppedError(Exception):
    """The decode was stopped from outside (its request is gone or past its deadline)."""


class StoppableReader(io.BytesIO):
    """The request's bytes as Pillow reads them, raising :class:`DecodeStoppedError` on the
    first read after ``stop()`` says so (the decoder's reads are kept to :data:`READ_BLOCK`
    by the image's ``decodermaxblock``)."""

    def __init__(self, data: bytes, stop: Callable[[], bool]) -> None:
        super().__init__(data)
        self._stop = stop

    def read(self, size: int | None = -1, /) -> bytes:
        if self._stop():
            raise DecodeStoppedError
        return super().read(size)


def _jpeg(data: bytes) -> None:
    # Entropy-coded data stuffs every 0xFF with 0x00, so FF DA only ever starts a scan.
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise StructureError(
            f"JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are decoded (each is a pass "
            "over every block of the image)"
        )


def _bmp(data: bytes) -> None:
    if len(data) < 34:
        return
    (header_size,) = struct.unpack_from("<I", data, 14)
    if header_size < 40:
        return  # OS/2 headers have no compression field
    width, height, _, _, compression = struct.unpack_from("<iiHHI", data, 18)
    pixels = abs(width) * abs(height)
    if compression in (1, 2) and pixels > MAX_BMP_RLE_PIXELS:
        raise StructureError(
            f"RLE-compressed BMP of {abs(width)}x{abs(height)} pixels; at most "
            f"{MAX_BMP_RLE_PIXELS} are decoded (RLE BMPs are decoded pixel by pixel)"
        )


def _tiff(data: bytes) -> None:
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8 or data[2:4] not in (b"*\x00", b"\x00*"):
        return  # BigTIFF and broken headers: Pillow refuses or reports them itself
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    if ifd + 2 > len(data):
        return
    (entries,) = struct.unpack_from(order + "H", data, ifd)
    for i in range(min(entries, 4096)):
        at = ifd + 2 + 12 * i
        if at + 12 > len(data):
            return
        tag, _, count = struct.unpack_from(order + "HHI", data, at)
        if tag in (273, 279, 324, 325) and count > MAX_TIFF_BLOCKS:  # strip/tile tables
            raise StructureError(
                f"TIFF has {count} strips or tiles; at most {MAX_TIFF_BLOCKS} are read"
            )


def _gif(data: bytes) -> None:
    if len(data) < 13:
        return
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks, size = 0, len(data)
    while pos < size and data[pos] == 0x21:  # extensions before the first image
        pos += 2
        while pos < size and data[pos]:
            blocks += 1
            if blocks > MAX_GIF_SUBBLOCKS:
                raise StructureError(
                    f"GIF has more than {MAX_GIF_SUBBLOCKS} extension sub-blocks before its "
                    "first image"
                )
            pos += 1 + data[pos]
        pos += 1


_CHECKS: tuple[tuple[bytes, Callable[[bytes], None]], ...] = (
    (b"\xff\xd8\xff", _jpeg),
    (b"BM", _bmp),
    (b"II*\x00", _tiff),
    (b"MM\x00*", _tiff),
    (b"GIF8", _gif),
)


def check_cost(data: bytes) -> None:
    """Refuse (:class:`StructureError`) a file whose structure no real image has and whose
    decode would take seconds to gigabytes whatever its pixel count."""
    for magic, check in _CHECKS:
        if data.startswith(magic):
            check(data)
            return
