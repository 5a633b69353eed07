"""Image -> input tensor, exactly as the card's ``input`` says. Torch-free.

Training, export parity checks and the service all call :func:`to_array`, so an image becomes
the same tensor everywhere. Decoding of request bytes (limits, error mapping) lives in the
service; this module starts from an opened :class:`PIL.Image.Image`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from modelcard.schema import InputSpec

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def open_image(data: bytes, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open without decoding pixels: size and format are known, nothing is allocated yet.
    ``formats`` limits which Pillow plugins may parse the bytes (None: any)."""
    return Image.open(io.BytesIO(data), formats=formats)


def resized_size(width: int, height: int, spec: InputSpec) -> tuple[int, int]:
    """The (width, height) the image is resized to before any crop."""
    if spec.resize == "stretch":
        return spec.width, spec.height
    assert spec.resize_shorter is not None
    scale = spec.resize_shorter / min(width, height)
    return max(spec.width, round(width * scale)), max(spec.height, round(height * scale))


def apply_draft(image: Image.Image, spec: InputSpec) -> None:
    """Let the JPEG decoder downscale in the DCT domain (by 1/2, 1/4 or 1/8) when the target is
    much smaller; it never goes below the size that is asked for, so quality is kept."""
    if image.format != "JPEG":
        return
    target = resized_size(*image.size, spec)
    gray = spec.color == "L" and image.mode == "RGB"
    image.draft("L" if gray else image.mode, target)


# Rows converted at once by _to_8bit: its int64 temporaries stay a few MB whatever the image.
_BAND_ROWS = 256


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring 16/32-bit and float images to 8 bits per channel (full range maps to full range).
    Converted in bands of rows: a whole-image int64 copy of a 40 Mpx image is 320 MB per
    temporary."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return image
    arr = np.asarray(image)
    out = np.empty(arr.shape, np.uint8)
    if image.mode == "F":
        for top in range(0, arr.shape[0], _BAND_ROWS):
            out[top : top + _BAND_ROWS] = np.clip(arr[top : top + _BAND_ROWS], 0, 255)
    else:
        peak = 65535 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        for top in range(0, arr.shape[0], _BAND_ROWS):
            band = arr[top : top + _BAND_ROWS].astype(np.int64)
            out[top : top + _BAND_ROWS] = np.clip((band * 255 + peak // 2) // peak, 0, 255)
    return Image.fromarray(out, "L")


def normalize_mode(image: Image.Image, color: str) -> Image.Image:
    """Any Pillow mode -> ``color`` ("L" or "RGB"). Transparency is composited onto black (the
    background Fashion-MNIST and most dataset crops use); palette images keep their colours."""
    image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
    return image if image.mode == color else image.convert(color)


def to_array(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Decoded image -> [C, H, W] array: uint8 pixels for an in-graph-normalising model,
    else float32 normalised as ``(x/255 - mean) / std``."""
    image = ImageOps.exif_transpose(image) or image
    image = normalize_mode(image, spec.color)
    size = resized_size(*image.size, spec)
    if image.size != size:
        image = image.resize(size, _RESAMPLE[spec.interpolation])
    if image.size != (spec.width, spec.height):
        left = (image.width - spec.width) // 2
        top = (image.height - spec.height) // 2
        image = image.crop((left, top, left + spec.width, top + spec.height))
    return pixels_to_input(np.asarray(image, dtype=np.uint8), spec)


def pixels_to_input(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 pixels of the model's size and colour (``[H, W]`` gray, ``[H, W, 3]`` RGB) ->
    its [C, H, W] input: as they are for an in-graph-normalising model, else float32
    normalised as ``(x/255 - mean) / std``."""
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if spec.dtype == "uint8":
        return np.ascontiguousarray(arr)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return ((arr.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def load_array(data: bytes, spec: InputSpec) -> np.ndarray:
    """Bytes of an image file -> input array (first frame of animations)."""
    image = open_image(data)
    apply_draft(image, spec)
    return to_array(image, spec)
