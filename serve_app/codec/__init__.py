"""Image bytes in and out: probe the header, decode once, encode the result.

``probe`` reads format and size from the header without decoding a pixel, so that oversized
inputs (decompression bombs included) are refused before any memory is spent on them.
``decode`` returns the array in OpenCV's layout (``IMREAD_UNCHANGED``: HxW gray, HxWx3 BGR,
HxWx4 BGRA; uint8 or uint16) with EXIF orientation applied, in the photo's own colour space
(``color``: only CMYK is converted, to sRGB), and the photo's metadata beside it
(``metadata``). ``encode`` writes PNG, JPEG, WebP or AVIF, with
the metadata made true for the new size. No input bytes, however broken, raise anything but
a ``PhotoEnhanceError``, and no message carries a library's own words (they go to the log).
``codec.workers`` runs decode and encode in stoppable workers; metadata blocks are capped
before they are parsed (``codec.metadata``), wherever the codec runs.

Format rules (also in the README):

- accepted inputs: JPEG, PNG, WebP, BMP, TIFF, HEIC/HEIF and AVIF, recognised by their magic
  bytes (the declared content type is not trusted); the first frame of an animated or
  multi-page file is used (the primary image of a HEIF);
- kept: gray stays gray, alpha stays alpha, 16 bits stay 16 bits; CMYK, palette, YCbCr and
  1-bit inputs become BGR (BGRA when the palette has transparency);
- default output format: the input's when it is PNG, JPEG, WebP or AVIF, JPEG for HEIC/HEIF,
  otherwise PNG; PNG as
  well when the result has alpha and the input's format is JPEG, or when it is 16-bit and
  the format would be JPEG or WebP (only PNG keeps 16 bits);
- an explicit ``format=jpeg`` on an image with alpha flattens it onto white; an explicit
  ``jpeg``/``webp`` on a 16-bit image scales it to 8 bits.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from serve_app.codec import color as colorm
from serve_app.codec.metadata import (
    ImageMetadata,
    attach,
    check_blocks,
    pillow_args,
    png_for_pillow,
    prepare,
    read_metadata,
)
from serve_app.codec.structure import check_structure
from serve_app.config import EncodingConfig, LimitsConfig
from serve_app.errors import (
    InvalidImage,
    InvalidOption,
    PayloadTooLarge,
    PhotoEnhanceError,
    TooManyPixels,
    UnsupportedMediaType,
)
from serve_app.options import OUTPUT_FORMATS, OutputFormat

LOGGER = logging.getLogger(__name__)

InputFormat = Literal["jpeg", "png", "webp", "bmp", "tiff", "heif", "avif"]

MEDIA_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "heif": "image/heic",
    "avif": "image/avif",
}
INPUT_FORMATS: tuple[str, ...] = tuple(MEDIA_TYPES)

# Pillow's names for the formats we accept; MPO is a multi-picture JPEG from cameras.
_PIL_FORMATS: dict[str, tuple[str, ...]] = {
    "jpeg": ("JPEG", "MPO"),
    "png": ("PNG",),
    "webp": ("WEBP",),
    "bmp": ("BMP", "DIB"),
    "tiff": ("TIFF",),
    "heif": ("HEIF",),
    "avif": ("AVIF",),
}
# ISO base media brands (the `ftyp` box) of the two still-image formats we read.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
# AVIF: libaom's speed 8 costs about half the CPU of its default (6) for a slightly larger file.
AVIF_SPEED = 8


def _register_heif() -> None:
    import pillow_heif

    # The primary image only: no thumbnails, depth or auxiliary images are decoded.
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


_register_heif()

# We enforce our own pixel limits (``check_pixels``) before decoding, and a broken file's
# TIFF tags are refused or ignored by us: Pillow's warnings about either would only flood
# the replica logs. (Filters are process-wide: ``catch_warnings`` is not thread-safe.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""

    format: InputFormat
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


@dataclass
class DecodedImage:
    """Pixels in OpenCV layout, after EXIF orientation, in the photo's own space (``metadata.
    icc_profile``; sRGB when a CMYK input was converted: ``metadata.pixels_in_srgb``); the
    photo's metadata beside them."""

    image: np.ndarray
    format: InputFormat
    metadata: ImageMetadata = field(default_factory=ImageMetadata)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def has_alpha(self) -> bool:
        return has_alpha(self.image)

    @property
    def bit_depth(self) -> int:
        return 16 if self.image.dtype == np.uint16 else 8


def has_alpha(image: np.ndarray) -> bool:
    return image.ndim == 3 and image.shape[2] == 4


# --------------------------------------------------------------------------- probing


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


def _describe_unsupported(data: bytes) -> str:
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


def _pillow_bytes(data: bytes, fmt: InputFormat) -> tuple[bytes, tuple[str, ...]]:
    """What Pillow is given to open, and the metadata blocks dropped on the way: a PNG's text
    chunks are removed first, so that Pillow never inflates them."""
    return png_for_pillow(data) if fmt == "png" else (data, ())


def _open(data: bytes, fmt: InputFormat) -> Image.Image:
    """Open lazily (header only). Pillow's own bomb guard is turned into our 413."""
    try:
        return Image.open(io.BytesIO(data), formats=_PIL_FORMATS[fmt])
    except Image.DecompressionBombError:
        raise TooManyPixels("image has too many pixels") from None
    except Exception as exc:  # Pillow raises many kinds on broken headers.
        # Its words name its own objects ("<_io.BytesIO object at 0x...>"), libheif's its
        # internals: the log has them, the client our own.
        LOGGER.info("%s header refused: %s", fmt, _short(exc))
        raise InvalidImage(f"broken {fmt} image: its header cannot be read") from None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


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
        raise UnsupportedMediaType(_describe_unsupported(data))
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        # Check the claimed size before any parser sees the rest of the file.
        check_pixels(int.from_bytes(data[16:20]), int.from_bytes(data[20:24]), limits, upscale)
    check_structure(data, fmt, limits)
    with _open(_pillow_bytes(data, fmt)[0], fmt) as im:
        width, height = im.size
        mode = im.mode
        check_blocks(im.info)
    check_pixels(width, height, limits, upscale)
    return ImageInfo(format=fmt, width=width, height=height, mode=mode)


# --------------------------------------------------------------------------- decoding


def decode(data: bytes, info: ImageInfo | None = None) -> DecodedImage:
    """Decode every pixel. Call ``probe`` first: this function trusts the size.

    Raises ``InvalidImage`` (422) for truncated or corrupt data, ``UnsupportedMediaType``
    (415) for what is not an image or a pixel format we cannot represent.
    """
    fmt = info.format if info else sniff(data)
    if fmt is None:
        raise UnsupportedMediaType(_describe_unsupported(data))
    try:
        image, meta = _decode(data, fmt)
    except PhotoEnhanceError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # never let a decoder's failure escape as a 500
        LOGGER.info("%s decode failed: %s", fmt, _short(exc))
        raise InvalidImage(f"broken {fmt} image: its data is truncated or corrupt") from None
    if image.size == 0:
        raise InvalidImage("image decoded to no pixels")
    meta = replace(meta, size=(int(image.shape[1]), int(image.shape[0])))
    return DecodedImage(image=np.ascontiguousarray(image), format=fmt, metadata=meta)


def _decode(data: bytes, fmt: InputFormat) -> tuple[np.ndarray, ImageMetadata]:
    view, dropped = _pillow_bytes(data, fmt)
    with _open(view, fmt) as im:
        meta, orientation = read_metadata(im, fmt, dropped)
        icc = meta.icc_profile
        converted = False
        if fmt == "heif" and int(im.info.get("bit_depth") or 8) > 8:
            image = _heif_deep(data)  # Pillow's HEIF opener reads 10 and 12 bits as 8
        elif _is_deep_color(im, data, fmt):
            image = _cv2_decode(data)  # Pillow cannot hold 16-bit colour; OpenCV keeps it
        else:
            im.load()  # raises on truncated or corrupt data
            if icc and im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            # RGB stays in its own space (``codec.color``); CMYK must become RGB for the models.
            if im.mode == "CMYK" and colorm.usable(icc, "CMYK"):
                im = colorm.pil_to_srgb(im, icc)  # type: ignore[arg-type]
                converted = True
            image = _pil_to_array(im)
    if fmt == "tiff":
        # libtiff's readers turn the pixels themselves: Pillow when it loads, OpenCV always.
        orientation = 1
    return _apply_orientation(image, orientation), replace(meta, pixels_in_srgb=converted)


def _heif_deep(data: bytes) -> np.ndarray:
    """A 10- or 12-bit HEIF's primary image at 16 bits (libheif scales it to the full range),
    turned by libheif as the opener does."""
    import pillow_heif

    heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False)
    image = np.asarray(heif[heif.primary_index])
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return image


def _is_deep_color(im: Image.Image, data: bytes, fmt: InputFormat) -> bool:
    if fmt == "png":
        # IHDR: bit depth at byte 24, colour type at 25 (2: RGB, 4: gray+alpha, 6: RGBA).
        return len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)
    if fmt == "tiff":
        bits = getattr(im, "tag_v2", {}).get(258)  # BitsPerSample
        if isinstance(bits, tuple | list):
            return len(bits) >= 2 and max(bits) > 8
    return False


def _cv2_decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidImage("image data is truncated or corrupt")
    if image.dtype not in (np.uint8, np.uint16):
        image = _to_uint16(image)
    return image


def _to_uint16(image: np.ndarray) -> np.ndarray:
    if np.issubdtype(image.dtype, np.floating):
        return (np.clip(image, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
    return np.clip(image, 0, 65535).astype(np.uint16)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        return _to_uint16(np.asarray(im))
    if mode == "F":
        return _to_uint16(np.asarray(im))
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode == "L":
        return np.asarray(im)
    if mode == "LA" or mode == "La":
        gray_alpha = np.asarray(im.convert("LA"))
        gray, alpha = gray_alpha[..., 0], gray_alpha[..., 1]
        return np.dstack([gray, gray, gray, alpha])
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    elif mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa"):
        return cv2.cvtColor(np.asarray(im.convert("RGBA")), cv2.COLOR_RGBA2BGRA)
    # RGB, CMYK, YCbCr, LAB, HSV, RGBX: all become BGR.
    return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1..8 as Pillow's ``ImageOps.exif_transpose`` applies it."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1, :]
    if orientation == 5:
        return np.swapaxes(image, 0, 1)
    if orientation == 6:
        return np.swapaxes(image, 0, 1)[:, ::-1]
    if orientation == 7:
        return np.swapaxes(image, 0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.swapaxes(image, 0, 1)[::-1, :]
    return image


# --------------------------------------------------------------------------- encoding


def output_format(requested: str | None, input_format: str, image: np.ndarray) -> OutputFormat:
    """The format to write: see the module docstring for the rules."""
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


def header_metadata(data: bytes, info: ImageInfo) -> ImageMetadata:
    """The metadata of an image decoded elsewhere (nvJPEG): read from the header, no pixels."""
    try:
        view, dropped = _pillow_bytes(data, info.format)
        with _open(view, info.format) as im:
            meta, _ = read_metadata(im, info.format, dropped)
    except PhotoEnhanceError:
        return ImageMetadata(size=(info.width, info.height))
    return replace(meta, size=(info.width, info.height))


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
        LOGGER.warning("%s encoding failed: %s", fmt, _short(exc))
        raise InvalidImage(f"could not encode the result as {fmt}", code="encode_failed") from None
    return buf.getvalue()


def _flatten_on_white(image: np.ndarray) -> np.ndarray:
    alpha = image[..., 3:4].astype(np.float32) / 255.0
    bgr = image[..., :3].astype(np.float32)
    return (bgr * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
