"""Image bytes in and out: probe the header, decode once, encode the result. The codec's front
door: other layers import these names from here (the modules behind it may move).

``probe`` (``probing.py``) reads format and size from the header without decoding a pixel, so
that oversized inputs (decompression bombs included) are refused before any memory is spent
on them. ``decode`` (``decoding.py``) returns the array in OpenCV's layout
(``IMREAD_UNCHANGED``: HxW gray, HxWx3 BGR, HxWx4 BGRA; uint8 or uint16) with EXIF
orientation applied, in the photo's own colour space (``color``: only CMYK is converted, to
sRGB), and the photo's metadata beside it (``metadata``). ``encode`` (``encoding.py``) writes
PNG, JPEG, WebP or AVIF, with the metadata made true for the new size. The shapes they share
are in ``types.py``, Pillow's opener in ``opener.py``. No input bytes, however broken, raise
anything but a ``PhotoEnhanceError``, and no message carries a library's own words (they go
to the log). ``codec.workers`` runs decode and encode in stoppable workers; metadata blocks
are capped before they are parsed (``codec.metadata``), wherever the codec runs.

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

from serve_app.codec.decoding import decode, header_metadata
from serve_app.codec.embedding import attach
from serve_app.codec.encoding import (
    AVIF_SPEED,
    CHROMA_444_FROM_QUALITY,
    encode,
    encode_positional,
    jpeg_sampling,
    jpeg_subsampling,
    output_format,
    png_params,
    prepare_output,
)
from serve_app.codec.metadata import ImageMetadata
from serve_app.codec.probing import check_pixels, probe, sniff
from serve_app.codec.types import (
    INPUT_FORMATS,
    MEDIA_TYPES,
    DecodedImage,
    ImageInfo,
    InputFormat,
    has_alpha,
)

__all__ = [
    "AVIF_SPEED",
    "CHROMA_444_FROM_QUALITY",
    "INPUT_FORMATS",
    "MEDIA_TYPES",
    "DecodedImage",
    "ImageInfo",
    "ImageMetadata",
    "InputFormat",
    "attach",
    "check_pixels",
    "decode",
    "encode",
    "encode_positional",
    "has_alpha",
    "header_metadata",
    "jpeg_sampling",
    "jpeg_subsampling",
    "output_format",
    "png_params",
    "prepare_output",
    "probe",
    "sniff",
]
