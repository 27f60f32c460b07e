"""Codec: probing without decoding, decoding every accepted format, encoding rules."""

from __future__ import annotations

import io
import random
import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from serve_app import codec
from serve_app.config import LimitsConfig
from serve_app.errors import (
    PayloadTooLarge,
    PhotoEnhanceError,
    TooManyPixels,
    UnsupportedMediaType,
)

LIMITS = LimitsConfig()

# Pillow warns about the broken files these tests make on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def roundtrip(data: bytes, limits: LimitsConfig = LIMITS) -> codec.DecodedImage:
    return codec.decode(data, codec.probe(data, limits))


@pytest.mark.parametrize(
    ("fmt", "pil_fmt"),
    [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"), ("tiff", "TIFF")],
)
def test_every_accepted_format(images, fmt, pil_fmt):
    rgb = images.array(30, 40)
    data = images.pil_bytes(Image.fromarray(rgb), pil_fmt)
    info = codec.probe(data, LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)
    decoded = codec.decode(data, info)
    assert decoded.image.shape == (30, 40, 3) and decoded.image.dtype == np.uint8
    assert decoded.format == fmt
    if fmt in ("png", "bmp", "tiff"):  # lossless: BGR of the RGB written
        assert np.array_equal(decoded.image, rgb[..., ::-1])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(images, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = images.pil_bytes(Image.fromarray(images.array(30, 50)), "JPEG", exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))[..., ::-1]
    decoded = roundtrip(data).image
    assert decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)
    assert decoded.shape[:2] == ((50, 30) if orientation >= 5 else (30, 50))


@pytest.mark.parametrize("pil_fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_bgr(images, pil_fmt):
    red = Image.new("RGB", (32, 24), (255, 0, 0)).convert("CMYK")
    decoded = roundtrip(images.pil_bytes(red, pil_fmt)).image
    assert decoded.shape == (24, 32, 3)
    b, g, r = decoded[12, 16].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_gray_stays_gray(images):
    for data in (
        images.pil_bytes(Image.fromarray(images.array(20, 30, 1)), "PNG"),
        images.pil_bytes(Image.fromarray(images.array(20, 30, 1)), "JPEG"),
        images.photo("00017_gray.png"),
    ):
        decoded = roundtrip(data)
        assert decoded.image.ndim == 2 and decoded.image.dtype == np.uint8


def test_alpha_is_kept(images):
    bgra = images.array(20, 30, 4)
    decoded = roundtrip(images.cv2_bytes(bgra, ".png"))
    assert np.array_equal(decoded.image, bgra) and decoded.has_alpha
    photo = roundtrip(images.photo("children-alpha.png"))
    assert photo.image.shape[2] == 4


def test_gray_alpha_and_palette_transparency(images):
    la = Image.fromarray(images.array(10, 12, 2), "LA")
    decoded = roundtrip(images.pil_bytes(la, "PNG")).image
    assert decoded.shape == (10, 12, 4)
    assert np.array_equal(decoded[..., 0], decoded[..., 2])
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] * 128)
    pal.info["transparency"] = 0
    assert roundtrip(images.pil_bytes(pal, "PNG", transparency=0)).image.shape == (8, 8, 4)


@pytest.mark.parametrize(("channels", "ext"), [(1, ".png"), (3, ".png"), (4, ".png"), (3, ".tiff")])
def test_sixteen_bit_is_kept(images, channels, ext):
    arr = images.array(20, 30, channels, "uint16")
    decoded = roundtrip(images.cv2_bytes(arr, ext))
    assert decoded.image.dtype == np.uint16 and decoded.bit_depth == 16
    assert np.array_equal(decoded.image, arr)


def test_png_bomb_refused_from_header_alone(images):
    data = images.png_header(100_000, 100_000)
    t0 = time.perf_counter()
    with pytest.raises(TooManyPixels) as err:
        codec.probe(data, LIMITS)
    # Generous (a busy 2-core machine): decoding 10^10 pixels would take minutes, not seconds.
    assert time.perf_counter() - t0 < 10
    assert err.value.status == 413
    # Beyond Pillow's own guard as well: still our 413, never a crash.
    huge = LimitsConfig(max_pixels=10**12, max_side=10**6, max_output_pixels=10**13)
    with pytest.raises(TooManyPixels):
        codec.probe(data, huge)


def test_jpeg_bomb_refused(images):
    with pytest.raises(TooManyPixels):
        codec.probe(images.jpeg_claiming(60_000, 60_000), LIMITS)


def test_side_and_output_limits(images):
    limits = LimitsConfig(max_pixels=10_000, max_side=200, max_output_pixels=20_000)
    assert codec.probe(images.png_header(100, 100), limits).pixels == 10_000
    with pytest.raises(TooManyPixels):
        codec.probe(images.png_header(300, 10), limits)
    with pytest.raises(TooManyPixels):
        codec.probe(images.png_header(101, 100), limits)
    with pytest.raises(TooManyPixels) as err:
        codec.probe(images.png_header(100, 100), limits, upscale=2)
    assert err.value.code == "too_many_output_pixels"


def test_too_many_bytes(images):
    limits = LimitsConfig(max_bytes=2048)
    with pytest.raises(PayloadTooLarge) as err:
        codec.probe(images.cv2_bytes(images.array(64, 64), ".png"), limits)
    assert err.value.status == 413


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
        b"<!DOCTYPE html><html><body>hi</body></html>",
        b"just some text, not a picture",
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        bytes(range(256)),
    ],
)
def test_not_images_are_415(data):
    with pytest.raises(UnsupportedMediaType) as err:
        codec.probe(data, LIMITS)
    assert err.value.status == 415


def test_shared_bad_files(shared_data):
    statuses = {}
    for path in sorted((shared_data / "bad").iterdir()):
        with pytest.raises(PhotoEnhanceError) as err:
            roundtrip(path.read_bytes())
        statuses[path.name] = err.value.status
    assert statuses == {"empty.jpg": 415, "not_an_image.png": 415, "truncated.jpg": 422}


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp", ".tiff"])
def test_truncated_files_are_422(images, ext):
    data = images.cv2_bytes(images.array(64, 64), ext)
    for cut in (len(data) // 2, len(data) * 3 // 4):
        with pytest.raises(PhotoEnhanceError) as err:
            roundtrip(data[:cut])
        assert (err.value.status, err.value.code) == (422, "invalid_image"), (ext, cut)


CORRUPTION_ANSWERS = {(422, "invalid_image"), (415, "unsupported_media_type"),
                      (413, "too_many_pixels")}


def test_random_corruption_never_crashes(images):
    rng = random.Random(7)
    seeds = [images.cv2_bytes(images.array(24, 24), ext) for ext in (".png", ".jpg", ".webp", ".tiff")]
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(8, len(data))] = rng.randrange(256)
        try:
            decoded = roundtrip(bytes(data))
        except PhotoEnhanceError as exc:
            # Which answer depends on the bytes hit (and on the decoders' own checks), so the
            # three a damaged file may earn: a broken body, a broken signature, a header that
            # now claims a huge size.
            assert (exc.status, exc.code) in CORRUPTION_ANSWERS, (exc.status, exc.code)
        else:
            assert decoded.image.size > 0


def test_output_format_rules(images):
    bgr, bgra = images.array(4, 4), images.array(4, 4, 4)
    deep = images.array(4, 4, 3, "uint16")
    assert codec.output_format(None, "jpeg", bgr) == "jpeg"
    assert codec.output_format(None, "webp", bgra) == "webp"
    assert codec.output_format(None, "jpeg", bgra) == "png"
    assert codec.output_format(None, "bmp", bgr) == "png"
    assert codec.output_format(None, "tiff", bgr) == "png"
    assert codec.output_format(None, "jpeg", deep) == "png"
    assert codec.output_format("jpeg", "png", bgra) == "jpeg"


def test_encode_rules(images):
    bgra = images.array(16, 16, 4)
    bgra[..., 3] = 0  # fully transparent: JPEG flattens onto white
    jpeg = cv2.imdecode(np.frombuffer(codec.encode(bgra, "jpeg", 90), np.uint8), cv2.IMREAD_UNCHANGED)
    assert jpeg.shape == (16, 16, 3) and jpeg.min() > 240
    deep = images.array(16, 16, 3, "uint16")
    png = cv2.imdecode(np.frombuffer(codec.encode(deep, "png"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and np.array_equal(png, deep)
    webp = codec.sniff(codec.encode(deep, "webp", 80))
    assert webp == "webp"
    gray = images.array(16, 16, 1)
    assert roundtrip(codec.encode(gray, "png")).image.ndim == 2
