"""Request bytes -> the model's input array, with limits and stable error codes.

Decoding and preprocessing are :mod:`modelcard.preprocessing`'s (the export's own path), so an
image served here becomes bit-for-bit the tensor the export checked parity with. This module
adds what serving needs around it: which formats are accepted, the pixel limit checked from
the header before any pixel is decoded, and errors that map onto HTTP statuses. (A lone plain
JPEG may be decoded by :mod:`service.ingress.plain_jpeg` instead: the same pixels, faster.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import struct
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from modelcard.preprocessing import apply_draft, resized_size, to_array
from modelcard.schema import InputSpec
from service.errors import ServiceError
from service.ingress import decode_limits
from service.ingress.decode_limits import DecodeStoppedError, StoppableReader

# Formats are restricted so that no other Pillow plugin ever parses request bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Pillow walks JPEG markers and PNG chunks in Python, one loop turn each: a 30 MB JPEG of
# 7.5 M empty markers or a PNG of 2.5 M tiny chunks takes it 15-22 s. Real files have a few
# dozen markers before the scan and, for PNG, a chunk per few KB of pixel data; these bounds
# keep the worst case to milliseconds and no real image near them.
MAX_JPEG_MARKERS = 20_000
MAX_PNG_CHUNKS_BASE = 10_000
PNG_BYTES_PER_EXTRA_CHUNK = 4096
_FILL = re.compile(rb"\xff+")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length


class ImageError(ServiceError):
    """One image cannot be classified (alone in a request, its status is the response's)."""


# glibc's M_MMAP_THRESHOLD: allocations at least this big get their own mapping.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 20


def configure_decoding() -> None:
    """Process-wide settings for decoding request images, once per worker.

    :func:`decode` checks ``width*height`` against the service's own limit right after the
    header is read, so Pillow's process-global (and differently sized) check is switched off;
    otherwise a limit configured above Pillow's would be silently capped by it.

    glibc raises its mmap threshold each time a mapped block is freed, so after the first big
    decode Pillow's 16 MB image blocks come from the decode thread's heap arena, which keeps
    them when freed: a worker that decoded one 600 MB image in each of its threads holds that
    much per thread for good. A fixed threshold maps every large block on its own and gives it
    back on free, so a worker's memory is the decodes running now, as the budget counts it."""
    Image.MAX_IMAGE_PIXELS = None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    mallopt = getattr(libc, "mallopt", None)  # glibc only (musl has none)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _check_jpeg_markers(data: bytes) -> None:
    """Count what Pillow's header loop would iterate over before the first scan."""
    pos, turns, size = 2, 0, len(data)
    while pos + 1 < size and turns <= MAX_JPEG_MARKERS:
        fill = _FILL.match(data, pos)
        if fill is None:
            return  # not a marker: Pillow reports the file as broken by itself
        turns += fill.end() - pos
        pos = fill.end()
        if pos >= size:
            return
        marker = data[pos]
        pos += 1
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image
            return
        if marker == 0x00 or marker in _STANDALONE:
            continue
        if pos + 2 > size:
            return
        (length,) = struct.unpack_from(">H", data, pos)
        pos += length
    if turns > MAX_JPEG_MARKERS:
        raise ImageError(
            400,
            "corrupt_image",
            f"JPEG has more than {MAX_JPEG_MARKERS} markers before its image data",
        )


def _check_png_chunks(data: bytes) -> None:
    limit = MAX_PNG_CHUNKS_BASE + len(data) // PNG_BYTES_PER_EXTRA_CHUNK
    pos, chunks, size = len(_PNG_SIGNATURE), 0, len(data)
    while pos + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if kind == b"IEND":
            return
        if chunks > limit:
            raise ImageError(
                400, "corrupt_image", f"PNG has more than {limit} chunks for {size} bytes"
            )
        pos += 12 + length


def check_structure(data: bytes) -> None:
    """Refuse files whose header would take Pillow seconds to walk (``corrupt_image``)."""
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg_markers(data)
    elif data[:8] == _PNG_SIGNATURE:
        _check_png_chunks(data)


def _bytes_per_pixel(mode: str) -> int:
    """How Pillow stores a mode: one byte for 1/L/P, two for 16-bit, else four."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


# Bytes per pixel a decoder holds beside the image it fills, per byte of the decoded pixel:
# libwebp's canvas and previous frame plus the frame it hands Pillow as bytes (alive until the
# image is closed); libtiff's strip buffer (up to the whole image for a one-strip file).
_DECODER_COPIES = {"WEBP": 3, "TIFF": 1}
# Allocator slack on top of the sum of the arrays (measured peak RSS over the estimate's sum
# stays below it for every mode and format in the hostile tests).
_SLACK = 1.15


def decode_cost(image: Image.Image, spec: InputSpec) -> int:
    """Upper estimate of the bytes :func:`finish` holds at its peak for ``image`` (after any
    JPEG draft): the decoded pixels and what the decoder keeps beside them, an EXIF-rotated
    copy, each mode conversion :func:`modelcard.preprocessing.normalize_mode` makes, and the
    resize's intermediate."""
    width, height = image.size
    pixels = width * height
    decoded = _bytes_per_pixel(image.mode)
    mode = image.mode
    if mode.startswith("I;16"):
        convert = 2 + 1 + 1  # numpy copy, uint8 array, the L image (row bands: no int64 copy)
    elif mode in ("I", "F"):
        convert = 4 + 1 + 1
    elif mode == "P":
        convert = 4 + 4 * 4  # RGBA (with transparency), then as RGBA
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        convert = 4 * 4  # RGBA copy, black background, composite, RGB
    elif mode in ("L", "RGB"):
        convert = 0
    else:
        convert = 4  # CMYK, YCbCr, 1, ... -> RGB
    target = 1 if spec.color == "L" else 4
    rotated = decoded if _exif_rotates(image) else 0
    held = _DECODER_COPIES.get(image.format or "", 0) * decoded
    new_w, _ = resized_size(width, height, spec)
    resize = new_w * height * 4 + spec.width * spec.height * 4
    return int(_SLACK * (pixels * (decoded + held + convert + target + rotated) + resize))


def _exif_rotates(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) not in (None, 1)
    except Exception:  # a broken EXIF block: exif_transpose will ignore it as well
        return False


def _never() -> bool:
    return False


def open_checked(data: bytes, max_pixels: int, stop: Callable[[], bool] = _never) -> Image.Image:
    """Read the header only and check it: ``empty_image`` (400), ``unsupported_format``
    (415), ``image_too_large`` (413, before any pixel is decoded), ``corrupt_image`` (400,
    a structure that would take Pillow seconds or gigabytes whatever the pixel count). Once
    ``stop()`` is true, the decode of the returned image ends at its next read (504)."""
    if not data:
        raise ImageError(400, "empty_image", "the image is empty (0 bytes)")
    check_structure(data)
    try:
        decode_limits.check_cost(data)
    except decode_limits.StructureError as e:
        raise ImageError(e.status, e.code, e.message) from None
    try:
        image = Image.open(StoppableReader(data, stop), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            415,
            "unsupported_format",
            f"not a supported image (accepted: {', '.join(FORMATS)}; first bytes {data[:8]!r})",
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError(413, "image_too_large", str(e)) from None
    except Exception as e:  # a header Pillow cannot parse, any exception type
        raise ImageError(400, "corrupt_image", f"cannot read the image header: {e}") from None
    image.decodermaxblock = decode_limits.READ_BLOCK
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageError(400, "corrupt_image", f"{image.format} claims {width}x{height} pixels")
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            413,
            "image_too_large",
            f"{image.format} of {width}x{height} = {width * height} pixels exceeds the limit "
            f"of {max_pixels} (SERESNET_MAX_IMAGE_PIXELS)",
        )
    return image


def finish(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Decode the pixels of an image from :func:`open_checked` into the model's [C, H, W]
    array (``corrupt_image`` 400 when the data is truncated or broken); closes the image."""
    with image:
        try:
            apply_draft(image, spec)  # idempotent when :func:`draft` ran already
            return to_array(image, spec)
        except DecodeStoppedError:
            raise ImageError(
                504, "deadline_exceeded", "decode stopped: the request is gone or past its deadline"
            ) from None
        except MemoryError:
            raise ImageError(
                413, "image_too_large", "not enough memory to decode the image"
            ) from None
        except Exception as e:  # truncated or corrupt data: many exception types
            raise ImageError(
                400, "corrupt_image", f"{image.format} data cannot be decoded: {e}"
            ) from None


def draft(image: Image.Image, spec: InputSpec) -> None:
    """Let a JPEG decode at a fraction of its size when the model needs far fewer pixels
    (before :func:`decode_cost`, which then sees the smaller size)."""
    apply_draft(image, spec)
