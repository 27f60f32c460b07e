"""Paste restored faces into the upsampled background: FaceRestoreHelper's arithmetic over
each face's box only.

Upstream warps every face and its mask over the whole output and blends the whole image in
float64. Outside a face's box its warps are exactly zero, so here each face is warped and
blended over its box only, and the cost follows the faces, not the output size.

The face warp decides the fidelity (a face pixel one level off, blended at mask ~1 and
truncated, can end two levels off), so it is made bit-identical to upstream's full-size
``cv2.warpAffine`` without computing the full size: OpenCV 5's linear kernels take float32
source coordinates computed from absolute destination indices, so a warp *translated* into
the box (``M[:, 2] -= ...``) rounds them differently (a grey level at sharp edges). Instead
the box's source coordinates are computed here exactly as OpenCV computes them for those
absolute indices (its own matrix inversion in doubles, then its float32 expressions: the
vector body ``fma(M0, x, float(float(y*M1) + M2))`` and the scalar code for each row's last
``width % lanes`` pixels), and ``cv2.remap`` samples them with the same kernel. The lane
count and the expressions are checked once per process against ``cv2.warpAffine``
(``_lanes``); where no candidate reproduces it bit for bit (another OpenCV build), paste
falls back to upstream's full-width warps, cut to the box (exact, slower).

The mask (float64 bicubic upstream) goes through the same coordinates in float32: 1e-4 at
most from upstream's, under 0.03 of a level through the blend. The blend runs in float32
(``b + m * (f - b)``, truncated like upstream's ``astype(uint8)``); faces whose boxes
overlap share one float canvas so that, as upstream, only the final sum is truncated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

_F32, _F64 = np.float32, np.float64


@dataclass
class Face:
    restored: np.ndarray  # 512x512x3 uint8 BGR
    affine: np.ndarray  # 2x3, input -> crop
    mask: np.ndarray  # 512x512 float soft mask (float64 from the parser, float32 accepted)


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


def cv_matrix(inv: np.ndarray) -> np.ndarray:
    """The destination -> source matrix ``cv2.warpAffine(src, inv, ...)`` samples with: its
    own inversion of ``inv``, in doubles, in its order of operations (6 values)."""
    m = [float(v) for v in np.asarray(inv, np.float64).ravel()]
    d = m[0] * m[4] - m[1] * m[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m[4] * d, m[0] * d
    m[0], m[1], m[3], m[4] = a11, m[1] * -d, m[3] * -d, a22
    b1 = -m[0] * m[2] - m[1] * m[5]
    b2 = -m[3] * m[2] - m[4] * m[5]
    m[2], m[5] = b1, b2
    return np.array(m, np.float64)


def source_maps(inv: np.ndarray, box: tuple[int, int, int, int], width: int,
                lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 source coordinates (x map, y map) of the box's pixels, as ``cv2.warpAffine``
    computes them for a ``width``-wide output (its vector body for the first
    ``width // lanes * lanes`` columns of a row, its scalar code for the rest). float32
    products of a float32 and a small integer are exact in float64, so the float64 sums below
    round once to float32, as the fused multiply-add does."""
    x0, y0, x1, y1 = box
    m = cv_matrix(inv).astype(_F32).astype(_F64)
    xs = np.arange(x0, x1, dtype=_F64)[None, :]
    ys = np.arange(y0, y1, dtype=_F64)[:, None]
    split = width // lanes * lanes - x0  # first box column done by the scalar code
    maps = []
    for a, b, c in (m[0:3], m[3:6]):
        yb = (b * ys).astype(_F32).astype(_F64)  # float(y * M1)
        out = np.empty((y1 - y0, x1 - x0), _F32)
        if split > 0:
            base = (yb + c).astype(_F32).astype(_F64)  # float(float(y * M1) + M2)
            out[:, :split] = a * xs[:, :split] + base
        if split < x1 - x0:
            k = max(split, 0)
            # scalar: x*M0 + y*M1 + M2, contracted to fma(x, M0, y*M1) + M2
            t = (a * xs[:, k:] + yb).astype(_F32).astype(_F64)
            out[:, k:] = t + c
        maps.append(out)
    return maps[0], maps[1]


def _warp_exact(img: np.ndarray, inv: np.ndarray, box, width: int, lanes: int | None,
                flags: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    if lanes is None:  # upstream's own warp over full rows, cut to the box
        return cv2.warpAffine(img, inv, (width, y1), flags=flags)[y0:, x0:x1]
    mx, my = source_maps(inv, box, width, lanes)
    return cv2.remap(img, mx, my, flags, borderMode=cv2.BORDER_CONSTANT)


@lru_cache(maxsize=1)
def _lanes() -> int | None:
    """The lane count for which ``source_maps`` + ``cv2.remap`` reproduce ``cv2.warpAffine``
    bit for bit on this OpenCV build and CPU (None: none does; paste uses full warps)."""
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    cases = []
    for scale, angle, shift, width in ((2.3, 0.2, (41.3, 17.9), 1201),
                                       (1.1, -0.45, (300.7, 9.2), 1003),
                                       (0.9, 0.05, (5.5, 250.25), 777)):
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        inv = np.array([[c, -s, shift[0]], [s, c, shift[1]]], np.float64)
        roi = _roi(inv, width, 1400)
        if roi is not None:
            full = cv2.warpAffine(src, inv, (width, roi[3]))[roi[1]:, roi[0]:roi[2]]
            cases.append((inv, roi, width, full))
    for lanes in (16, 8, 32, 64, 4):
        if all(np.array_equal(_warp_exact(src, inv, roi, w, lanes, cv2.INTER_LINEAR), full)
               for inv, roi, w, full in cases):
            return lanes
    return None


def _clusters(boxes: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Indices of faces grouped by overlapping boxes (transitively), each group in order."""
    parent = list(range(len(boxes)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, a in enumerate(boxes):
        for j in range(i):
            b = boxes[j]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def placements(faces: list[Face], upscale: float, w: int, h: int):
    """(face, inverse matrix, box) of each face that lands on the output, in order."""
    placed = []
    for f in faces:
        inv = inverse(f.affine, upscale)
        roi = _roi(inv, w, h)
        if roi is not None:
            placed.append((f, inv, roi))
    return placed


def paste(background: np.ndarray, faces: list[Face], upscale: float, *,
          copy: bool = True) -> np.ndarray:
    """The faces blended, in order, into ``background`` (HxWx3 or HxWx4 uint8); with
    ``copy=False`` into ``background`` itself (a caller that drops it saves a copy)."""
    out = background.copy() if copy else background
    h, w = out.shape[:2]
    placed = placements(faces, upscale, w, h)
    lanes = _lanes()
    for group in _clusters([r for _, _, r in placed]):
        if len(group) == 1:  # a face alone: blended straight into the output's box
            f, inv, box = placed[group[0]]
            x0, y0, x1, y1 = box
            _blend(out[y0:y1, x0:x1, 0:3], f, inv, box, w, lanes)
            continue
        ux0 = min(placed[i][2][0] for i in group)
        uy0 = min(placed[i][2][1] for i in group)
        ux1 = max(placed[i][2][2] for i in group)
        uy1 = max(placed[i][2][3] for i in group)
        canvas = out[uy0:uy1, ux0:ux1, 0:3].astype(_F32)
        for i in group:
            f, inv, (x0, y0, x1, y1) = placed[i]
            sub = canvas[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
            _blend(sub, f, inv, (x0, y0, x1, y1), w, lanes)
        out[uy0:uy1, ux0:ux1, 0:3] = canvas  # truncated once, as upstream's astype(uint8)
    return out


def _blend(sub: np.ndarray, f: Face, inv: np.ndarray, box, width: int,
           lanes: int | None) -> None:
    """``sub`` (the box of the output, uint8, or of a float32 canvas) <- its blend with the
    face: ``sub + m * (face - sub)`` in float32, three passes over the box. Into uint8 the
    assignment truncates, and wraps where the bicubic mask overshoots [0, 1] (255 + 1.9 ->
    0), exactly as upstream's ``astype(np.uint8)`` does."""
    face = _warp_exact(f.restored, inv, box, width, lanes, cv2.INTER_LINEAR)
    mask = _warp_exact(f.mask.astype(_F32, copy=False), inv, box, width, lanes,
                       cv2.INTER_CUBIC)
    d = np.subtract(face, sub, dtype=_F32)
    d *= mask[:, :, None]
    d += sub
    sub[...] = d
