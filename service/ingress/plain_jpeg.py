"""The fast lane for the commonest request image: a plain JPEG, decoded by libjpeg-turbo's
TurboJPEG API (simplejpeg) into exactly the pixels Pillow's decode gives, in a quarter of the
time (a 224x224 JPEG for the embedded model: 58 vs 201 us; Pillow spends the rest opening
the file object, parsing the header in Python and building Image objects).

Exactly, because both ask the same library for the same decode: the slow integer IDCT, fancy
upsampling, the same DCT-domain scale Pillow's ``draft`` picks (1/2, 1/4 or 1/8, never below
the size the model needs), and libjpeg's own grayscale output when the model is grayscale.
Everything after the decode (mode, resize, crop, normalisation) is still
:mod:`modelcard.preprocessing`'s (``pixels_to_input`` alone when the decode already has the
model's size and colour, as the embedded model's 1/8 scale of a 224x224 JPEG has). A file is
plain when nothing before its first scan can change the pixels Pillow would give: only
JFIF/comment segments, tables, restart interval and a baseline, extended or progressive
frame, in YCbCr or grayscale. Anything else (EXIF or XMP orientation, ICC, Adobe colour
transforms, CMYK, arithmetic coding, a recoverable libjpeg warning) is None here and goes
the Pillow way, which also gives every error its text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from modelcard.preprocessing import pixels_to_input, resized_size, to_array
from modelcard.schema import InputSpec
from service.ingress import decode_limits

_SOI = b"\xff\xd8\xff"
# APP0 (JFIF), COM, DQT, DHT, DRI, and frames SOF0-2 (baseline, extended, progressive).
_PLAIN_SEGMENTS = {0xE0, 0xFE, 0xDB, 0xC4, 0xDD, 0xC0, 0xC1, 0xC2}
_SOS = 0xDA
_SCALES = (8, 4, 2, 1)  # what Pillow's JpegImageFile.draft tries, largest first
_TURBO_COLORSPACE = {"YCbCr": "RGB", "Gray": "GRAY"}
_MODE = {"RGB": "RGB", "GRAY": "L"}
_COST_SLACK = 2


@dataclass(frozen=True)
class PlainJpeg:
    data: bytes
    colorspace: str  # TurboJPEG's output: "RGB" or "GRAY"
    size: tuple[int, int]  # (width, height) after the DCT-domain scale
    cost: int  # bytes the decode and preprocessing hold at their peak, an upper estimate

    def to_array(self, spec: InputSpec) -> np.ndarray | None:
        """The model's [C, H, W] array, or None when libjpeg-turbo objects to the data (the
        Pillow path then decodes it, or reports what is wrong)."""
        width, height = self.size
        try:
            pixels = simplejpeg.decode_jpeg(
                self.data, colorspace=self.colorspace, min_width=width, min_height=height
            )
        except ValueError:
            return None
        if pixels.shape[:2] != (height, width):
            return None  # a scale other than Pillow's: never guess
        if self.colorspace == "GRAY":
            pixels = pixels[:, :, 0]
        exact = self.size == (spec.width, spec.height) == resized_size(*self.size, spec)
        if exact and _MODE[self.colorspace] == spec.color:
            # Already the model's size and colour: nothing for Pillow's resize or crop to do.
            return pixels_to_input(pixels, spec)
        return to_array(Image.fromarray(pixels, _MODE[self.colorspace]), spec)


def _plain_segments(data: bytes) -> bool:
    """Whether every segment before the first scan is one that cannot change the pixels."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == _SOS:
            return True
        if marker not in _PLAIN_SEGMENTS:
            return False
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
    return False


def plain_jpeg(data: bytes, spec: InputSpec, max_pixels: int) -> PlainJpeg | None:
    """``data`` as a :class:`PlainJpeg` for ``spec``'s model, or None when it is not one, or
    when its pixel count or structure would be refused (the Pillow path says why)."""
    if not data.startswith(_SOI) or not _plain_segments(data):
        return None
    try:
        decode_limits.check_cost(data)
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (decode_limits.StructureError, ValueError):
        return None
    turbo = _TURBO_COLORSPACE.get(colorspace)
    if turbo is None or width < 1 or height < 1 or width * height > max_pixels:
        return None
    if spec.color == "L":
        turbo = "GRAY"  # Pillow's draft("L"): libjpeg's own luma, as Pillow gets it
    target_w, target_h = resized_size(width, height, spec)
    fits = min(width // target_w, height // target_h)
    scale = next((s for s in _SCALES if fits >= s), 1)
    scaled_w, scaled_h = (width + scale - 1) // scale, (height + scale - 1) // scale
    # The decoded array, its Image (Pillow keeps RGB in four bytes a pixel), the resize's
    # intermediate and result.
    stored = 1 if turbo == "GRAY" else 4
    cost = scaled_w * scaled_h * (stored + 3) + (target_w * scaled_h + target_w * target_h) * stored
    return PlainJpeg(data, turbo, (scaled_w, scaled_h), _COST_SLACK * cost)
