"""The codec's shared shapes: the formats it reads, what a header says (``ImageInfo``) and
decoded pixels with the photo's metadata beside them (``DecodedImage``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from serve_app.codec.metadata import ImageMetadata

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
