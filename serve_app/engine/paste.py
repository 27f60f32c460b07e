"""Paste restored faces into the upsampled background: FaceRestoreHelper's arithmetic.

Upstream warps every face and its mask over the whole output and blends the whole image
in float64. Here each warp covers only the face's bounding box (the rest of upstream's
warp is exactly zero there), and the float64 blend covers the union of those boxes, so
the cost follows the faces, not the output size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Face:
    restored: np.ndarray  # 512x512x3 uint8 BGR
    affine: np.ndarray  # 2x3, input -> crop
    mask: np.ndarray  # 512x512 float64 soft mask


def inverse(affine: np.ndarray, upscale: float) -> np.ndarray:
    inv = cv2.invertAffineTransform(affine) * upscale
    if upscale > 1:
        # upstream's "extra offset, for more precise back alignment"
        inv[:, 2] += 0.5 * upscale
    return inv


def _roi(inv: np.ndarray, w: int, h: int) -> tuple[int, int, int, int] | None:
    corners = np.array([[0, 0, 1], [512, 0, 1], [0, 512, 1], [512, 512, 1]], np.float64)
    pts = corners @ inv.T
    s = math.hypot(inv[0, 0], inv[1, 0])
    margin = int(4 * s) + 4  # bicubic reaches two source pixels beyond the crop
    x0 = max(int(math.floor(pts[:, 0].min())) - margin, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - margin, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + margin, w)
    y1 = min(int(math.ceil(pts[:, 1].max())) + margin, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def paste(background: np.ndarray, faces: list[Face], upscale: float) -> np.ndarray:
    """The faces blended, in order, into ``background`` (HxWx3 or HxWx4 uint8)."""
    out = background.copy()
    h, w = out.shape[:2]
    placed = []
    for f in faces:
        inv = inverse(f.affine, upscale)
        roi = _roi(inv, w, h)
        if roi is not None:
            placed.append((f, inv, roi))
    if not placed:
        return out
    ux0 = min(r[0] for _, _, r in placed)
    uy0 = min(r[1] for _, _, r in placed)
    ux1 = max(r[2] for _, _, r in placed)
    uy1 = max(r[3] for _, _, r in placed)
    canvas = out[uy0:uy1, ux0:ux1, 0:3].astype(np.float64)
    for f, inv, (x0, y0, x1, y1) in placed:
        m = inv.copy()
        m[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)
        face = cv2.warpAffine(f.restored, m, size)
        mask = cv2.warpAffine(f.mask, m, size, flags=cv2.INTER_CUBIC)[:, :, None]
        sub = canvas[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
        sub[...] = mask * face + (1 - mask) * sub
    out[uy0:uy1, ux0:ux1, 0:3] = canvas.astype(np.uint8)
    return out
