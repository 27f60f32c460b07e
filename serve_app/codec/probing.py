"""Probing: format and size from the header, refused against the limits before a pixel is
decoded (so a decompression bomb stops here), and the format a body's magic bytes name."""

from __future__ import annotations

from serve_app.codec.metadata import check_blocks
from serve_app.codec.opener import open_image, pillow_bytes
from serve_app.codec.structure import check_structure
from serve_app.codec.types import ImageInfo, InputFormat
from serve_app.config import LimitsConfig
from serve_app.errors import InvalidImage, PayloadTooLarge, TooManyPixels, UnsupportedMediaType

# ISO base media brands (the `ftyp` box) of the two still-image formats we read.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})


def sniff(data: bytes) -> InputFormat | None:
    """The format named by the magic bytes, or None."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[4:8] == b"ftyp":
        size = int.from_bytes(data[:4], "big")
        brands = {data[i:i + 4] for i in range(8, min(max(size, 16), 64, len(data)), 4)}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    return None


def describe_unsupported(data: bytes) -> str:
    text = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text or (text.startswith(b"<?xml") and b"svg" in data[:4096].lower()):
        return "SVG is not supported; send JPEG, PNG, WebP, BMP, TIFF, HEIC or AVIF"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "HTML is not an image; send JPEG, PNG, WebP, BMP, TIFF, HEIC or AVIF"
    if text.startswith(b"<"):
        return "XML is not an image; send JPEG, PNG, WebP, BMP, TIFF, HEIC or AVIF"
    if text.startswith(b"gif8"):
        return "GIF is not supported; send JPEG, PNG, WebP, BMP, TIFF, HEIC or AVIF"
    if _looks_like_text(data[:1024]):
        return "text is not an image; send JPEG, PNG, WebP, BMP, TIFF, HEIC or AVIF"
    return "not a supported image; send JPEG, PNG, WebP, BMP, TIFF, HEIC or AVIF"


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_pixels(width: int, height: int, limits: LimitsConfig, upscale: int = 1) -> None:
    """Refuse sizes beyond the limits (input side, input pixels, output pixels)."""
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has an empty size {width}x{height}")
    if max(width, height) > limits.max_side:
        raise TooManyPixels(
            f"image is {width}x{height}; the largest side accepted is {limits.max_side}",
            width=width, height=height, max_side=limits.max_side,
        )
    if width * height > limits.max_pixels:
        raise TooManyPixels(
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels}",
            width=width, height=height, max_pixels=limits.max_pixels,
        )
    out = width * height * upscale * upscale
    if out > limits.max_output_pixels:
        raise TooManyPixels(
            f"output would be {out} pixels (x{upscale}); the limit is {limits.max_output_pixels}",
            code="too_many_output_pixels",
            width=width, height=height, upscale=upscale,
            max_output_pixels=limits.max_output_pixels,
        )


def probe(data: bytes, limits: LimitsConfig, upscale: int = 1) -> ImageInfo:
    """Format and size from the header; refuse what is not accepted. Decodes no pixels."""
    if not data:
        raise UnsupportedMediaType("empty body: no image", code="empty_body")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"body is {len(data)} bytes; the limit is {limits.max_bytes}",
            max_bytes=limits.max_bytes,
        )
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMediaType(describe_unsupported(data))
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        # Check the claimed size before any parser sees the rest of the file.
        check_pixels(int.from_bytes(data[16:20]), int.from_bytes(data[20:24]), limits, upscale)
    check_structure(data, fmt, limits)
    with open_image(pillow_bytes(data, fmt)[0], fmt) as im:
        width, height = im.size
        mode = im.mode
        check_blocks(im.info)
    check_pixels(width, height, limits, upscale)
    return ImageInfo(format=fmt, width=width, height=height, mode=mode)
