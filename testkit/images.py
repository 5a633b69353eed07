"""Real image files for tests, made with Pillow (and a few crafted headers for bad input).

Everything returns the bytes of a file; nothing large is ever allocated (the "bombs" only
claim their size in the header).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour image with edges (closer to a photo than noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(x / max(width, 1) * 6.0 + rng.uniform(0, 3))
    g = 127 + 120 * np.cos(y / max(height, 1) * 5.0 + rng.uniform(0, 3))
    b = np.where((x // 37 + y // 29) % 2 == 0, 40.0, 210.0)
    return Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def animated_gif(values: tuple[int, ...] = (50, 200, 120), size: int = 28) -> bytes:
    frames = [Image.new("L", (size, size), v) for v in values]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def png16(size: int = 28) -> bytes:
    ramp = np.arange(size * size, dtype=np.float64).reshape(size, size) / (size * size - 1)
    return encode(Image.fromarray((ramp * 65535).astype(np.uint16)), "PNG")


def cmyk_jpeg(size: int = 64) -> bytes:
    return encode(photo(size, size).convert("CMYK"), "JPEG", quality=90)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    """A tiny GIF whose screen and first frame claim ``width`` x ``height``."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28">'
    b'<rect width="28" height="28"/></svg>'
)
TEXT = b"this is a text file, not a JPEG\n"


def truncated_jpeg() -> bytes:
    data = encode(photo(200, 150), "JPEG", quality=90)
    return data[: len(data) // 2]


def png(pixels: np.ndarray) -> bytes:
    """A greyscale (2-D uint8) or RGB (H, W, 3) array as a PNG file."""
    return encode(Image.fromarray(pixels), "PNG")


def noise_png(seed: int, size: int = 28) -> bytes:
    """A size x size greyscale PNG of uniform noise, different for each seed."""
    return png(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))
