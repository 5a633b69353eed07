"""service.imaging: every accepted format decodes to exactly the tensor the export's own
preprocessing (modelcard.preprocessing.load_array) gives, plus independent pixel checks, and
every bad input gets its stable code and HTTP status. Images are real files made by Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelcard.preprocessing import load_array
from modelcard.schema import InputSpec
from service.ingress.imaging import ImageError, finish, open_checked
from service.ingress.plain_jpeg import plain_jpeg
from testkit.images import SVG, TEXT, encode, gif_claiming, photo, png_claiming

GRAY28 = InputSpec(channels=1, height=28, width=28, color="L", mean=[0.5], std=[0.5])
RGB224 = InputSpec(
    channels=3,
    height=224,
    width=224,
    color="RGB",
    resize="shorter-side-crop",
    resize_shorter=256,
    mean=[0.485, 0.456, 0.406],
    std=[0.229, 0.224, 0.225],
)
RGB224_FLOAT = RGB224.model_copy(update={"dtype": "float32", "normalization": "caller"})
LIMIT = 40_000_000


def decode(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Both of the worker's steps for one image: the header check, then the decode."""
    return finish(open_checked(data, max_pixels), spec)


def _save(tmp_path: Path, name: str, image: Image.Image, **params: object) -> bytes:
    path = tmp_path / name
    image.save(path, **params)
    return path.read_bytes()


def _check_same_as_export(data: bytes, spec: InputSpec) -> np.ndarray:
    out = decode(data, spec, LIMIT)
    assert out.shape == (spec.channels, spec.height, spec.width)
    assert out.dtype == np.dtype(spec.dtype)
    expected = load_array(data, spec)
    assert np.array_equal(out, expected)  # bit-identical to the export's preprocessing
    return out


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("spec", [GRAY28, RGB224, RGB224_FLOAT], ids=["L28", "RGB224", "f32"])
@pytest.mark.parametrize(
    ("name", "mode", "params"),
    [
        ("a.jpg", "RGB", {"quality": 90}),
        ("a.png", "RGB", {}),
        ("a.webp", "RGB", {"quality": 90}),
        ("a.bmp", "RGB", {}),
        ("a.gif", "P", {}),
        ("a.tif", "RGB", {}),
        ("gray.png", "L", {}),
        ("gray.jpg", "L", {}),
        ("la.png", "LA", {}),
        ("rgba.webp", "RGBA", {}),
        ("bits.png", "1", {}),
        ("cmyk.jpg", "CMYK", {}),
        ("cmyk.tif", "CMYK", {}),
    ],
)
def test_every_format_matches_export_preprocessing(
    tmp_path: Path, spec: InputSpec, name: str, mode: str, params: dict
) -> None:
    image = photo(300, 200).convert(mode)
    _check_same_as_export(_save(tmp_path, name, image, **params), spec)


def test_gray_png_pixels_pass_through_unchanged(tmp_path: Path) -> None:
    pixels = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    data = _save(tmp_path, "g.png", Image.fromarray(pixels.astype(np.uint8), "L"))
    out = _check_same_as_export(data, GRAY28)
    assert np.array_equal(out[0], pixels.astype(np.uint8))


def test_float_spec_normalises_with_card_mean_and_std(tmp_path: Path) -> None:
    data = _save(tmp_path, "c.png", Image.new("RGB", (256, 256), (255, 0, 128)))
    out = _check_same_as_export(data, RGB224_FLOAT)
    for c, value in enumerate((255, 0, 128)):
        want = (value / 255.0 - RGB224.mean[c]) / RGB224.std[c]
        assert np.allclose(out[c], want, atol=1e-6)


def test_animated_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("L", (28, 28), v) for v in (50, 200, 120)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    out = _check_same_as_export(path.read_bytes(), GRAY28)
    assert np.all(out == 50)


def test_sixteen_bit_png_maps_full_range_to_eight_bits(tmp_path: Path) -> None:
    ramp = np.arange(28 * 28, dtype=np.float64).reshape(28, 28) / (28 * 28 - 1) * 65535
    ramp = ramp.astype(np.uint16)
    data = _save(tmp_path, "deep.png", Image.fromarray(ramp))
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode in ("I;16", "I")  # really 16 bits per sample
    out = _check_same_as_export(data, GRAY28)
    expected = (ramp.astype(np.int64) * 255 + 32767) // 65535
    assert np.array_equal(out[0], expected.astype(np.uint8))


def test_cmyk_jpeg_colours_are_converted(tmp_path: Path) -> None:
    white = _save(tmp_path, "w.jpg", Image.new("CMYK", (28, 28), (0, 0, 0, 0)))
    black = _save(tmp_path, "k.jpg", Image.new("CMYK", (28, 28), (0, 0, 0, 255)))
    assert decode(white, GRAY28, LIMIT).min() >= 250
    assert decode(black, GRAY28, LIMIT).max() <= 5


def test_palette_with_transparency_composites_on_black(tmp_path: Path) -> None:
    image = Image.new("P", (28, 28), 0)
    image.putpalette([255, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    image.paste(1, (14, 0, 28, 28))  # right half: opaque white; left half: transparent red
    data = _save(tmp_path, "pa.png", image, transparency=0)
    out = _check_same_as_export(data, GRAY28)[0]
    assert np.all(out[:, :14] == 0)
    assert np.all(out[:, 14:] == 255)


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, left half dark; orientation 6 means "rotate 90° clockwise to
    # view", so the viewed image is 20 wide x 40 high with the dark half on top.
    stored = np.full((20, 40), 230, dtype=np.uint8)
    stored[:, :20] = 20
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(tmp_path, "rot.jpg", Image.fromarray(stored, "L"), exif=exif, quality=95)
    out = _check_same_as_export(data, GRAY28)[0].astype(int)
    assert out[:10].mean() < 60 and out[-10:].mean() > 190  # dark top, bright bottom
    upright = np.asarray(
        Image.fromarray(stored, "L")
        .transpose(Image.Transpose.ROTATE_270)
        .resize((28, 28), Image.Resampling.BILINEAR),
        dtype=int,
    )
    assert np.abs(out - upright).mean() < 4


def test_large_jpeg_uses_dct_downscaling_close_to_full_decode(tmp_path: Path) -> None:
    data = _save(tmp_path, "big.jpg", photo(1600, 1200, seed=3), quality=92)
    out = _check_same_as_export(data, RGB224)
    with Image.open(io.BytesIO(data)) as full:
        w, h = full.size
        scale = 256 / min(w, h)
        resized = full.convert("RGB").resize(
            (round(w * scale), round(h * scale)), Image.Resampling.BILINEAR
        )
        left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
        plain = np.asarray(resized.crop((left, top, left + 224, top + 224))).transpose(2, 0, 1)
    assert np.abs(out.astype(int) - plain.astype(int)).mean() < 6


def test_one_pixel_image_is_classifiable(tmp_path: Path) -> None:
    out = _check_same_as_export(_save(tmp_path, "dot.png", Image.new("L", (1, 1), 77)), GRAY28)
    assert np.all(out == 77)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bomb", [png_claiming, gif_claiming], ids=["png", "gif"])
@pytest.mark.parametrize("pillow_check", [False, True], ids=["service", "pillow-default"])
def test_decompression_bomb_is_refused_from_the_header(
    bomb, pillow_check: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bomb(30000, 30000)
    assert len(data) < 200
    if not pillow_check:  # as in the service, which checks its own limit instead
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(io.BytesIO(data)) as check:
            assert check.size == (30000, 30000)
    with pytest.raises(ImageError) as info:
        decode(data, GRAY28, LIMIT)
    assert (info.value.status, info.value.code) == (413, "image_too_large")
    if not pillow_check:
        assert "30000x30000" in info.value.message


def test_pixel_limit_is_the_configured_one() -> None:
    data = png_claiming(100, 100)
    with pytest.raises(ImageError) as info:
        decode(data, GRAY28, max_pixels=9_999)
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (TEXT, 415, "unsupported_format"),
        (SVG, 415, "unsupported_format"),
        (b"P5\n28 28\n255\n" + bytes(28 * 28), 415, "unsupported_format"),  # PGM: not accepted
    ],
    ids=["empty", "text", "svg", "pgm"],
)
def test_not_an_accepted_image(data: bytes, status: int, code: str) -> None:
    with pytest.raises(ImageError) as info:
        decode(data, GRAY28, LIMIT)
    assert (info.value.status, info.value.code) == (status, code)
    assert info.value.message


@pytest.mark.parametrize("name", ["t.jpg", "t.png", "t.webp", "t.gif", "t.tif"])
def test_truncated_image_is_corrupt(tmp_path: Path, name: str) -> None:
    data = _save(tmp_path, name, photo(200, 150).convert("P" if name.endswith("gif") else "RGB"))
    with pytest.raises(ImageError) as info:
        decode(data[: len(data) // 2], RGB224, LIMIT)
    assert (info.value.status, info.value.code) == (400, "corrupt_image")


# ----------------------------------------------------------------------------- hostile input


def test_header_walk_bounds_let_real_files_through_and_stop_bombs() -> None:
    from service.ingress.imaging import MAX_JPEG_MARKERS, check_structure

    real_jpeg = encode(photo(640, 480), "JPEG", quality=90)
    real_png = encode(photo(300, 200), "PNG")
    check_structure(real_jpeg)
    check_structure(real_png)
    stuffed = real_jpeg[:2] + b"\xff\x01" * (MAX_JPEG_MARKERS + 1) + real_jpeg[2:]
    with pytest.raises(ImageError, match="markers") as e:
        check_structure(stuffed)
    assert e.value.status == 400
    filled = real_jpeg[:2] + b"\xff" * 1_000_000 + real_jpeg[2:]  # fill bytes: one turn each
    with pytest.raises(ImageError, match="markers"):
        check_structure(filled)
    empty = struct.pack(">I", 0) + b"prIv" + struct.pack(">I", zlib.crc32(b"prIv"))
    chunky = real_png[:33] + empty * 200_000 + real_png[33:]
    with pytest.raises(ImageError, match="chunks"):
        check_structure(chunky)


def test_decode_cost_counts_conversions_and_rotation() -> None:
    from modelcard.preprocessing import open_image
    from service.ingress.imaging import decode_cost

    gray = GRAY28
    rgba = Image.new("RGBA", (1000, 1000))
    l8 = Image.new("L", (1000, 1000))
    assert decode_cost(l8, gray) < decode_cost(rgba, gray)
    assert decode_cost(rgba, gray) >= 1000 * 1000 * (4 + 16)  # decoded + four RGBA-size copies
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(photo(400, 300), "JPEG", exif=exif)
    upright = encode(photo(400, 300), "JPEG")
    assert decode_cost(open_image(rotated), gray) > decode_cost(open_image(upright), gray)


# ----------------------------------------------------------------------------- plain JPEGs


def _plain(data: bytes, spec: InputSpec) -> np.ndarray | None:
    plain = plain_jpeg(data, spec, LIMIT)
    return None if plain is None else plain.to_array(spec)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


RGB224_STRETCH = RGB224_FLOAT.model_copy(update={"resize": "stretch"})


@pytest.mark.parametrize(
    "spec",
    [GRAY28, RGB224, RGB224_FLOAT, RGB224_STRETCH],
    ids=["L28", "RGB224", "f32", "f32-stretch"],
)
@pytest.mark.parametrize(
    ("size", "mode", "params"),
    [
        ((224, 224), "RGB", {"quality": 90}),  # decoded at the model's size: no Pillow at all
        ((100, 37), "RGB", {"quality": 75}),  # odd sizes: the scaled size rounds up
        ((640, 480), "RGB", {"quality": 95, "subsampling": 0}),  # 4:4:4
        ((333, 517), "RGB", {"quality": 85, "subsampling": 1}),  # 4:2:2
        ((1000, 700), "RGB", {"quality": 80, "progressive": True}),
        ((300, 200), "RGB", {"quality": 60, "restart_marker_blocks": 4}),  # DRI
        ((256, 256), "L", {"quality": 90}),  # grayscale JPEG
        ((17, 9), "RGB", {"quality": 90}),  # smaller than the model: upscaled, no DCT scale
    ],
)
def test_a_plain_jpeg_decodes_to_exactly_pillows_pixels(
    spec: InputSpec, size: tuple[int, int], mode: str, params: dict
) -> None:
    data = encode(photo(*size).convert(mode), "JPEG", **params)
    fast = _plain(data, spec)
    assert fast is not None, "a plain JPEG must take the TurboJPEG lane"
    assert fast.dtype == np.dtype(spec.dtype)
    assert fast.shape == (spec.channels, spec.height, spec.width)
    np.testing.assert_array_equal(fast, load_array(data, spec))  # bit for bit


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(photo(64, 48), "JPEG", exif=_exif(6)),  # EXIF orientation
        lambda: encode(photo(64, 48), "JPEG", exif=_exif(1)),  # any APP1 goes Pillow's way
        lambda: encode(photo(64, 48), "JPEG", icc_profile=b"\0" * 128),  # APP2 ICC
        lambda: encode(Image.new("CMYK", (64, 48), (10, 20, 30, 40)), "JPEG"),  # Adobe, CMYK
        lambda: encode(photo(64, 48), "PNG"),
        lambda: encode(photo(64, 48), "JPEG")[:-200],  # truncated: Pillow names the error
        lambda: b"\xff\xd8\xff\xe0\x00",  # a header cut in its first segment
    ],
    ids=["exif-rotated", "exif", "icc", "cmyk", "png", "truncated", "cut-header"],
)
def test_what_is_not_a_plain_jpeg_goes_the_pillow_way(make) -> None:  # type: ignore[no-untyped-def]
    assert _plain(make(), GRAY28) is None


def test_the_jpeg_lane_keeps_the_pixel_limit() -> None:
    data = encode(photo(300, 200), "JPEG")
    assert plain_jpeg(data, GRAY28, 300 * 200) is not None
    assert plain_jpeg(data, GRAY28, 300 * 200 - 1) is None  # Pillow's path answers the 413
