"""Request bytes -> the model's input array, with limits and stable error codes.

Decoding and preprocessing are :mod:`modelcard.preprocessing`'s (the export's own path), so an
image served here becomes bit-for-bit the tensor the export checked parity with. This module
adds what serving needs around it: which formats are accepted, the pixel limit checked from
the header before any pixel is decoded, and errors that map onto HTTP statuses.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from modelcard.preprocessing import apply_draft, open_image, to_array
from modelcard.schema import InputSpec
from service.errors import ServiceError

# Formats are restricted so that no other Pillow plugin ever parses request bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class ImageError(ServiceError):
    """One image cannot be classified (alone in a request, its status is the response's)."""


def disable_pillow_bomb_check() -> None:
    """:func:`decode` checks ``width*height`` against the service's own limit right after the
    header is read, so Pillow's process-global (and differently sized) check is switched off;
    otherwise a limit configured above Pillow's would be silently capped by it."""
    Image.MAX_IMAGE_PIXELS = None


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only and check it: ``empty_image`` (400), ``unsupported_format``
    (415), ``image_too_large`` (413, before any pixel is decoded), ``corrupt_image`` (400)."""
    if not data:
        raise ImageError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        image = open_image(data, formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            415, "unsupported_format",
            f"not a supported image (accepted: {', '.join(FORMATS)}; first bytes {data[:8]!r})",
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError(413, "image_too_large", str(e)) from None
    except Exception as e:  # a header Pillow cannot parse, any exception type
        raise ImageError(400, "corrupt_image", f"cannot read the image header: {e}") from None
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageError(400, "corrupt_image", f"{image.format} claims {width}x{height} pixels")
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            413, "image_too_large",
            f"{image.format} of {width}x{height} = {width * height} pixels exceeds the limit "
            f"of {max_pixels} (SERESNET_MAX_IMAGE_PIXELS)",
        )
    return image


def finish(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Decode the pixels of an image from :func:`open_checked` into the model's [C, H, W]
    array (``corrupt_image`` 400 when the data is truncated or broken); closes the image."""
    with image:
        try:
            apply_draft(image, spec)
            return to_array(image, spec)
        except MemoryError:
            raise ImageError(413, "image_too_large", "not enough memory to decode the image") \
                from None
        except Exception as e:  # truncated or corrupt data: many exception types
            raise ImageError(
                400, "corrupt_image", f"{image.format} data cannot be decoded: {e}"
            ) from None


def decode(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Bytes of one image file -> [C, H, W] array as the card says (both steps above)."""
    return finish(open_checked(data, max_pixels), spec)
