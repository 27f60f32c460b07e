"""Pillow's side of the codec, shared by probing and decoding: the formats it may open
(HEIF registered once, with this package), a header opened lazily with Pillow's own refusals
turned into ours, and a library's words shortened for the log (never for the client)."""

from __future__ import annotations

import io
import logging
import warnings

from PIL import Image

from serve_app.codec.pngtext import png_for_pillow
from serve_app.codec.types import InputFormat
from serve_app.errors import InvalidImage, TooManyPixels

LOGGER = logging.getLogger(__name__)

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


def pillow_bytes(data: bytes, fmt: InputFormat) -> tuple[bytes, tuple[str, ...]]:
    """What Pillow is given to open, and the metadata blocks dropped on the way: a PNG's text
    chunks are removed first, so that Pillow never inflates them."""
    return png_for_pillow(data) if fmt == "png" else (data, ())


def open_image(data: bytes, fmt: InputFormat) -> Image.Image:
    """Open lazily (header only). Pillow's own bomb guard is turned into our 413."""
    try:
        return Image.open(io.BytesIO(data), formats=_PIL_FORMATS[fmt])
    except Image.DecompressionBombError:
        raise TooManyPixels("image has too many pixels") from None
    except Exception as exc:  # Pillow raises many kinds on broken headers.
        # Its words name its own objects ("<_io.BytesIO object at 0x...>"), libheif's its
        # internals: the log has them, the client our own.
        LOGGER.info("%s header refused: %s", fmt, short(exc))
        raise InvalidImage(f"broken {fmt} image: its header cannot be read") from None


def short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
