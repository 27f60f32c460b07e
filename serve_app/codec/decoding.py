"""Decoding: every pixel, in OpenCV's layout (``IMREAD_UNCHANGED``: HxW gray, HxWx3 BGR,
HxWx4 BGRA; uint8 or uint16), EXIF orientation applied, in the photo's own colour space (only
CMYK is converted, to sRGB), with the photo's metadata beside them; and the metadata alone of
an image decoded elsewhere (nvJPEG)."""

from __future__ import annotations

import io
import logging
from dataclasses import replace

import cv2
import numpy as np
from PIL import Image

from serve_app.codec import color as colorm
from serve_app.codec.metadata import ImageMetadata, read_metadata
from serve_app.codec.opener import open_image, pillow_bytes, short
from serve_app.codec.probing import describe_unsupported, sniff
from serve_app.codec.types import DecodedImage, ImageInfo, InputFormat
from serve_app.errors import InvalidImage, PhotoEnhanceError, UnsupportedMediaType

LOGGER = logging.getLogger(__name__)


def decode(data: bytes, info: ImageInfo | None = None) -> DecodedImage:
    """Decode every pixel. Call ``probe`` first: this function trusts the size.

    Raises ``InvalidImage`` (422) for truncated or corrupt data, ``UnsupportedMediaType``
    (415) for what is not an image or a pixel format we cannot represent.
    """
    fmt = info.format if info else sniff(data)
    if fmt is None:
        raise UnsupportedMediaType(describe_unsupported(data))
    try:
        image, meta = _decode(data, fmt)
    except PhotoEnhanceError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # never let a decoder's failure escape as a 500
        LOGGER.info("%s decode failed: %s", fmt, short(exc))
        raise InvalidImage(f"broken {fmt} image: its data is truncated or corrupt") from None
    if image.size == 0:
        raise InvalidImage("image decoded to no pixels")
    meta = replace(meta, size=(int(image.shape[1]), int(image.shape[0])))
    return DecodedImage(image=np.ascontiguousarray(image), format=fmt, metadata=meta)


def _decode(data: bytes, fmt: InputFormat) -> tuple[np.ndarray, ImageMetadata]:
    view, dropped = pillow_bytes(data, fmt)
    with open_image(view, fmt) as im:
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


def header_metadata(data: bytes, info: ImageInfo) -> ImageMetadata:
    """The metadata of an image decoded elsewhere (nvJPEG): read from the header, no pixels."""
    try:
        view, dropped = pillow_bytes(data, info.format)
        with open_image(view, info.format) as im:
            meta, _ = read_metadata(im, info.format, dropped)
    except PhotoEnhanceError:
        return ImageMetadata(size=(info.width, info.height))
    return replace(meta, size=(info.width, info.height))
