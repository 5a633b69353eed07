"""Attack files for the hostile tests, each built from a few bytes of real encoder output plus
crafted structure, small on disk and expensive to parse or decode (none allocates its decoded
size here)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each SOS scan, its entropy-coded data included."""
    out, pos = [], 2
    while pos < len(jpeg):
        assert jpeg[pos] == 0xFF
        marker = jpeg[pos + 1]
        if marker == 0xD9:
            break
        (length,) = struct.unpack_from(">H", jpeg, pos + 2)
        end = pos + 2 + length
        if marker == 0xDA:
            while not (jpeg[end] == 0xFF and jpeg[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, pos, end))
        pos = end
    return out


def progressive_jpeg_scans(size: int = 6000, scans: int = 1000) -> bytes:
    """A flat progressive grayscale JPEG whose first AC scan is repeated ``scans`` times: each
    repeat is a few dozen bytes (one long end-of-band run) and a full pass over every block."""
    real = _encode(Image.new("L", (size, size), 128), "JPEG", progressive=True, quality=90)
    segs = _segments(real)
    sos = [s for s in segs if s[0] == 0xDA]
    head_end = sos[1][1]  # DC scan kept, the first AC scan is the one repeated
    ac = real[sos[1][1] : sos[1][2]]
    return real[:head_end] + ac * scans + real[sos[1][2] :]


def bmp_rle8_eol(width: int = 6000, height: int = 6000) -> bytes:
    """An RLE8 BMP whose every row is one pixel and an end-of-line code: Pillow pads the rest
    of each row one byte per Python loop turn."""
    data = b"\x01\x00\x00\x00" * height + b"\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def tiff_strips(strips: int = 5_000_000) -> bytes:
    """A 1-pixel-wide grayscale TIFF of ``strips`` one-row strips (all pointing at one byte)."""
    entries = []
    n_entries = 8
    ifd_size = 2 + 12 * n_entries + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 2 * strips

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    entries = [
        entry(256, 4, 1, 1),  # ImageWidth
        entry(257, 4, 1, strips),  # ImageLength
        entry(258, 3, 1, 8),  # BitsPerSample
        entry(259, 3, 1, 1),  # Compression: none
        entry(262, 3, 1, 1),  # Photometric: black is zero
        entry(273, 4, strips, offsets_at),  # StripOffsets
        entry(278, 4, 1, 1),  # RowsPerStrip
        entry(279, 3, strips, counts_at),  # StripByteCounts (SHORT)
    ]
    ifd = struct.pack("<H", n_entries) + b"".join(entries) + struct.pack("<I", 0)
    offsets = struct.pack("<I", data_at) * strips
    counts = struct.pack("<H", 1) * strips
    return b"II*\x00" + struct.pack("<I", 8) + ifd + offsets + counts + b"\x80"


def png16_gray(size: int = 6324) -> bytes:
    """A 16-bit grayscale PNG of zeros, compressed row by row."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + size * 2)
    idat = b"".join(z.compress(row) for _ in range(size)) + z.flush()
    return _png(struct.pack(">IIBBBBB", size, size, 16, 0, 0, 0, 0), idat)


def _png(ihdr: bytes, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiff_int32(size: int = 6324) -> bytes:
    """A deflate-compressed 32-bit signed integer grayscale TIFF of zeros (one strip)."""
    z = zlib.compressobj(9)
    row = b"\x00" * (size * 4)
    data = b"".join(z.compress(row) for _ in range(size)) + z.flush()
    n_entries = 10

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    data_at = 8 + 2 + 12 * n_entries + 4
    entries = [
        entry(256, 4, 1, size),
        entry(257, 4, 1, size),
        entry(258, 3, 1, 32),
        entry(259, 3, 1, 8),  # Adobe deflate
        entry(262, 3, 1, 1),
        entry(273, 4, 1, data_at),
        entry(277, 3, 1, 1),
        entry(278, 4, 1, size),
        entry(279, 4, 1, len(data)),
        entry(339, 3, 1, 2),  # SampleFormat: signed integer
    ]
    ifd = struct.pack("<H", n_entries) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + data


def gif_comment_blocks(blocks: int = 10_000_000) -> bytes:
    """A 1x1 GIF whose comment extension is ``blocks`` sub-blocks of two bytes each."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    comment = b"\x21\xfe" + b"\x02ab" * blocks + b"\x00"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return head + comment + image + b"\x3b"


def webp_lossless(size: int = 6300) -> bytes:
    """A lossless WebP of one flat colour: about 1.6 KB, ``size``^2 RGBA pixels decoded."""
    return _encode(Image.new("RGBA", (size, size), (10, 200, 30, 128)), "WEBP", lossless=True)


def photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=85)
