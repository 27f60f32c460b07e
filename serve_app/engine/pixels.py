"""Pixel helpers shared by the pipeline and the reference: input checks, bit depth."""

from __future__ import annotations

from typing import Any

import numpy as np

from serve_app.errors import InvalidImage


def check_image(img: Any) -> np.ndarray:
    """Refuse what OpenCV's IMREAD_UNCHANGED could not have produced."""
    if not isinstance(img, np.ndarray):
        raise InvalidImage(f"expected a numpy array, got {type(img).__name__}")
    if img.dtype not in (np.uint8, np.uint16):
        raise InvalidImage(f"unsupported pixel type {img.dtype}; expected uint8 or uint16")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise InvalidImage(f"unsupported image shape {img.shape}")
    if min(img.shape[:2]) < 2:
        raise InvalidImage(f"image too small: {img.shape[1]}x{img.shape[0]}")
    return np.ascontiguousarray(img)


def to_8bit(img: np.ndarray) -> np.ndarray:
    """A 16-bit image at 8 bits, rounded (as upstream's pipelines see it)."""
    return np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
