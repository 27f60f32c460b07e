"""Paste restored faces into the upsampled background: FaceRestoreHelper's arithmetic.

Upstream warps every face and its mask over the whole output and blends the whole image
in float64. Here the float64 blend covers only the union of the faces' bounding boxes (the
rest of upstream's warps is exactly zero there), so the blend's cost follows the faces, not
the output size.

The warps are not translated into the box: OpenCV computes source coordinates from absolute
destination pixel indices (float32 in OpenCV 5's 8-bit linear kernels, 1/1024 fixed point
in the others), so ``M[:, 2] -= (x0, y0)`` on a box-sized output rounds differently and moved
the warped mask by up to 2.5e-4 and the face by a grey level at high-contrast edges: with
the float64 -> uint8 truncation of the blend that made pixels 1-2 levels off upstream.
The row width matters too: the vectorised kernels leave each row's last ``width % lanes``
pixels to scalar code that rounds differently, so a narrower output changes which pixels
take which path. Each warp is therefore made over upstream's full width and rows
``[0, y1)``, with upstream's own matrix (same pixel indices and code paths, bit-identical
values), and cut to the box; only the rows below the last face are saved.
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
        # upstream's matrix and pixel indices (see the module docstring), cut to the box
        face = cv2.warpAffine(f.restored, inv, (w, y1))[y0:, x0:x1]
        mask = cv2.warpAffine(f.mask, inv, (w, y1), flags=cv2.INTER_CUBIC)[y0:, x0:x1, None]
        sub = canvas[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
        sub[...] = mask * face + (1 - mask) * sub
    out[uy0:uy1, ux0:ux1, 0:3] = canvas.astype(np.uint8)
    return out
