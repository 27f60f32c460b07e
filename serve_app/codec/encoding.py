"""Encoding: PNG, JPEG, WebP or AVIF, in the output's colour profile, with the photo's
metadata made true for the new size; and the rules that pick the format, the PNG parameters
and the JPEG chroma subsampling."""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
from PIL import Image

from serve_app.codec import color as colorm
from serve_app.codec.embedding import attach, pillow_args
from serve_app.codec.metadata import ImageMetadata, prepare
from serve_app.codec.opener import short
from serve_app.codec.types import has_alpha
from serve_app.config import EncodingConfig
from serve_app.errors import InvalidImage, InvalidOption
from serve_app.options import OUTPUT_FORMATS, OutputFormat

LOGGER = logging.getLogger(__name__)

# AVIF: libaom's speed 8 costs about half the CPU of its default (6) for a slightly larger file.
AVIF_SPEED = 8


def output_format(requested: str | None, input_format: str, image: np.ndarray) -> OutputFormat:
    """The format to write: the rules are in ``serve_app.codec``'s docstring."""
    if requested is not None:
        if requested not in OUTPUT_FORMATS:
            raise InvalidOption(
                f"format must be one of {list(OUTPUT_FORMATS)}", field="format"
            )
        return requested  # type: ignore[return-value]
    fmt: OutputFormat = (  # type: ignore[assignment]
        input_format if input_format in OUTPUT_FORMATS
        else "jpeg" if input_format == "heif" else "png"
    )
    if image.dtype == np.uint16 and fmt != "png":
        return "png"
    if has_alpha(image) and fmt == "jpeg":
        return "png"
    return fmt


def png_params(settings: EncodingConfig | None = None) -> list[int]:
    """OpenCV's PNG parameters. The default (Huffman only, Paeth filter) was measured 2.6x to
    3.5x faster than zlib level 3 with libpng's adaptive filters and 8-16% smaller on photos
    (docs/BENCHMARKS.md, "Encoders")."""
    s = settings or EncodingConfig()
    return [
        cv2.IMWRITE_PNG_COMPRESSION, s.png_compression,
        cv2.IMWRITE_PNG_STRATEGY, _PNG_STRATEGIES[s.png_strategy],
        cv2.IMWRITE_PNG_FILTER, _PNG_FILTERS[s.png_filter],
    ]


_PNG_STRATEGIES = {
    "default": cv2.IMWRITE_PNG_STRATEGY_DEFAULT,
    "filtered": cv2.IMWRITE_PNG_STRATEGY_FILTERED,
    "huffman": cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    "rle": cv2.IMWRITE_PNG_STRATEGY_RLE,
    "fixed": cv2.IMWRITE_PNG_STRATEGY_FIXED,
}
_PNG_FILTERS = {
    "none": cv2.IMWRITE_PNG_FILTER_NONE,
    "sub": cv2.IMWRITE_PNG_FILTER_SUB,
    "up": cv2.IMWRITE_PNG_FILTER_UP,
    "avg": cv2.IMWRITE_PNG_FILTER_AVG,
    "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
    "all": cv2.IMWRITE_PNG_ALL_FILTERS,
    "fast": cv2.IMWRITE_PNG_FAST_FILTERS,
}


def encode(
    image: np.ndarray, fmt: str = "png", quality: int = 95,
    settings: EncodingConfig | None = None, *, metadata: ImageMetadata | None = None,
    keep: str = "keep", color: str = "keep", chroma: str = "auto",
) -> bytes:
    """Encode an OpenCV-layout array. JPEG flattens alpha onto white; JPEG/WebP/AVIF are 8-bit.

    ``metadata`` (a ``DecodedImage``'s) is written back as ``keep`` says (``keep``, ``strip``,
    ``keep-no-gps``), in the profile ``color`` says (``keep``: the input's, values untouched;
    ``srgb``: converted to sRGB, with an sRGB profile attached). JPEG goes through OpenCV's
    libjpeg-turbo (measured as fast as the alternatives) with the chroma subsampling
    ``jpeg_subsampling`` picks; ``settings`` tune PNG.
    """
    if fmt not in OUTPUT_FORMATS:
        raise InvalidOption(f"format must be one of {list(OUTPUT_FORMATS)}", field="format")
    image, out = prepare_output(image, fmt, metadata, keep, color)
    if fmt == "avif" or (fmt == "webp" and not out.empty):
        return _pil_encode(image, fmt, quality, out)
    if fmt == "png":
        params = png_params(settings)
        ext = ".png"
    elif fmt == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                  _CV2_SAMPLING[jpeg_subsampling(chroma, quality)]]
        ext = ".jpg"
    else:
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
        ext = ".webp"
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image), params)
    if not ok:
        raise InvalidImage(f"could not encode the result as {fmt}", code="encode_failed")
    return attach(buf.tobytes(), fmt, out) if not out.empty else buf.tobytes()


def encode_positional(
    image: np.ndarray, fmt: str, quality: int, settings: EncodingConfig | None,
    metadata: ImageMetadata | None, keep: str, color: str, chroma: str = "auto",
) -> bytes:
    """``encode`` with every argument by position: what a codec worker is sent."""
    return encode(
        image, fmt, quality, settings, metadata=metadata, keep=keep, color=color, chroma=chroma
    )


# From this JPEG quality up, ``chroma=auto`` keeps full-resolution colour (4:4:4): at 4:2:0,
# saturated edges (red on dark) bleed, which is what a photographer asking for 90+ sees.
CHROMA_444_FROM_QUALITY = 90
_CV2_SAMPLING = {
    "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
}


def jpeg_subsampling(chroma: str, quality: int) -> str:
    """The JPEG chroma subsampling (``"444"`` or ``"420"``) for the ``chroma`` option."""
    if chroma in _CV2_SAMPLING:
        return chroma
    if chroma != "auto":
        raise InvalidOption("chroma must be one of ['auto', '444', '420']", field="chroma")
    return "444" if quality >= CHROMA_444_FROM_QUALITY else "420"


def jpeg_sampling(data: bytes) -> str | None:
    """The chroma subsampling a JPEG was written with ("444", "420", "422", ...), from its
    frame header's sampling factors; None for gray or when there is no frame header."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2) and pos + 10 <= len(data):
            count = data[pos + 9]
            factors = [data[pos + 11 + 3 * i] for i in range(count) if pos + 12 + 3 * i <= len(data)]
            if count != 3 or len(factors) != 3:
                return None
            h, v = factors[0] >> 4, factors[0] & 15
            if any(f != 0x11 for f in factors[1:]):
                return "other"
            return {(1, 1): "444", (2, 1): "422", (2, 2): "420", (1, 2): "440"}.get((h, v), "other")
        if marker == 0xDA:
            return None
        pos += 2 + length
    return None


def prepare_output(
    image: np.ndarray, fmt: str, metadata: ImageMetadata | None, keep: str = "keep",
    color: str = "keep",
) -> tuple[np.ndarray, ImageMetadata]:
    """The pixels as ``fmt`` takes them (output profile, 8 bits, alpha flattened for JPEG) and
    the metadata to attach afterwards (``attach``): for encoders other than ``encode``'s."""
    meta = metadata or ImageMetadata()
    image, icc = _output_color(image, meta, color)
    if fmt in ("jpeg", "webp", "avif") and image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if fmt == "jpeg" and has_alpha(image):
        image = _flatten_on_white(image)
    if fmt in _RGB_ONLY and image.ndim == 2 and icc:
        # These encoders store gray as RGB: a GRAY profile would not match the pixels.
        rgb = colorm.gray_to_srgb(image, icc)
        image, icc = (rgb, colorm.srgb_profile()) if rgb is not None else (image, None)
    srgb = None if icc is None else colorm.is_srgb(icc)
    return image, prepare(
        meta, keep, int(image.shape[1]), int(image.shape[0]), icc, fmt=fmt, srgb=srgb
    )


# Output formats whose encoders here write gray pixels as RGB (Pillow's WebP and AVIF).
_RGB_ONLY = frozenset({"webp", "avif"})


def _output_color(
    image: np.ndarray, meta: ImageMetadata, color: str
) -> tuple[np.ndarray, bytes | None]:
    """The pixels in the output's profile, and the profile to attach (None: none). The
    profile always describes the pixels: one of another colour space is never attached."""
    icc = meta.icc_profile
    found = colorm.space(icc)
    if not (image.ndim == 3 and image.shape[2] in (3, 4)):  # gray: only a gray profile fits
        return image, icc if found == "GRAY" else None
    if found != "RGB" or meta.pixels_in_srgb:
        # No profile (sRGB by convention), a broken one, a CMYK one the pixels were converted
        # from, or a gray one on pixels the engine made colour.
        return image, colorm.srgb_profile() if color == "srgb" or meta.pixels_in_srgb else None
    if color != "srgb" or colorm.is_srgb(icc):  # type: ignore[arg-type]
        return image, icc  # keep: the photo's own values and profile, untouched
    out = colorm.array_convert(image, icc, to_srgb=True)  # type: ignore[arg-type]
    if out is None:
        return image, icc  # a 16-bit image in a LUT profile: not converted, still the truth
    return out, colorm.srgb_profile()


def _pil_encode(image: np.ndarray, fmt: str, quality: int, meta: ImageMetadata) -> bytes:
    if image.ndim == 2:
        pil = Image.fromarray(image, "L")
    elif image.shape[2] == 4:
        pil = Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA), "RGBA")
    else:
        pil = Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), "RGB")
    args = pillow_args(meta)
    if fmt == "avif":
        args.update(speed=AVIF_SPEED, max_threads=1)
    buf = io.BytesIO()
    try:
        pil.save(buf, fmt.upper(), quality=int(quality), **args)
    except MemoryError:
        raise
    except Exception as exc:
        LOGGER.warning("%s encoding failed: %s", fmt, short(exc))
        raise InvalidImage(f"could not encode the result as {fmt}", code="encode_failed") from None
    return buf.getvalue()


def _flatten_on_white(image: np.ndarray) -> np.ndarray:
    alpha = image[..., 3:4].astype(np.float32) / 255.0
    bgr = image[..., :3].astype(np.float32)
    return (bgr * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
