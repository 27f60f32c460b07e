"""The paste blend on the model's device: ``paste.paste`` in torch ops.

Same boxes, same overlap groups, same order as the CPU path (``paste``); the warps are
``grid_sample`` over the 512x512 crop (bilinear for the face, bicubic for the mask: both
OpenCV's kernels, A = -0.75, zero outside the crop as ``BORDER_CONSTANT``), the blend is
float32 on the device, and only each group's box goes to the device and back. The warped
face stays float (OpenCV rounds it to uint8), so a pixel is at most half a level from the
CPU path's before the blend and at most one level after its truncation
(``tests/test_paste.py`` holds it to that). On a GPU node this takes the blend off the
replica's CPU cores; on a CPU device it is only for tests (the CPU path is cheaper there).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.engine import paste as cpu_paste
from serve_app.engine.paste import Face

_CROP = 512


def _grid(inv: np.ndarray, box: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    """(1, h, w, 2) sampling grid of the box: OpenCV's destination -> source matrix in
    float64, normalised for ``align_corners=False`` (pixel centres at (2i + 1) / 512 - 1)."""
    x0, y0, x1, y1 = box
    m = torch.from_numpy(cpu_paste.cv_matrix(inv)).to(device)
    xs = torch.arange(x0, x1, device=device, dtype=torch.float64)[None, :]
    ys = torch.arange(y0, y1, device=device, dtype=torch.float64)[:, None]
    sx = m[0] * xs + (m[1] * ys + m[2])
    sy = m[3] * xs + (m[4] * ys + m[5])
    g = torch.stack([sx, sy], dim=-1).mul_(2 / _CROP).add_(1 / _CROP - 1)
    return g.to(torch.float32)[None]


@torch.inference_mode()
def paste(background: np.ndarray, faces: list[Face], upscale: float, device: torch.device,
          *, copy: bool = True) -> np.ndarray:
    """``paste.paste`` with the warps and the blend on ``device``."""
    out = background.copy() if copy else background
    h, w = out.shape[:2]
    placed = cpu_paste.placements(faces, upscale, w, h)
    for group in cpu_paste._clusters([r for _, _, r in placed]):
        ux0 = min(placed[i][2][0] for i in group)
        uy0 = min(placed[i][2][1] for i in group)
        ux1 = max(placed[i][2][2] for i in group)
        uy1 = max(placed[i][2][3] for i in group)
        region = np.ascontiguousarray(out[uy0:uy1, ux0:ux1, 0:3])
        canvas = torch.from_numpy(region).to(device, non_blocking=True).float()
        for i in group:
            f, inv, (x0, y0, x1, y1) = placed[i]
            grid = _grid(inv, (x0, y0, x1, y1), device)
            crop = torch.from_numpy(np.ascontiguousarray(f.restored)).to(device)
            crop = crop.permute(2, 0, 1)[None].float()
            mask = torch.from_numpy(np.asarray(f.mask, np.float32)).to(device)[None, None]
            face = F.grid_sample(crop, grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)[0].permute(1, 2, 0)
            m = F.grid_sample(mask, grid, mode="bicubic", padding_mode="zeros",
                              align_corners=False)[0, 0, :, :, None]
            sub = canvas[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
            sub += (face - sub) * m
        # upstream's astype(uint8): truncated, and wrapped where the bicubic mask overshoots
        # [0, 1] at its hard 10 px border (255 + 1.9 -> 0: a black pixel upstream makes too,
        # which NumPy's cast gives on x86 by way of int32); float -> uint8 directly is
        # undefined outside [0, 256), so through int32 here as well
        res = canvas.to(torch.int32).to(torch.uint8).cpu().numpy()
        out[uy0:uy1, ux0:ux1, 0:3] = res
    return out
