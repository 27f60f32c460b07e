"""Face restoration (GFPGAN) and parsing (ParseNet) of many 512x512 crops in chunked forwards.

Pre- and post-processing are upstream's (basicsr img2tensor / tensor2img, facexlib's paste
mask) done on whole batches on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serve_app.engine.added import Served
from serve_app.engine.chunks import Lanes, chunk_size, forward_chunks, gfpgan_bytes, parse_bytes

# facexlib's parsing classes kept in the paste mask (255) or dropped (0)
_MASK_COLORMAP = torch.tensor(
    [0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0],
    dtype=torch.float64,
)


def _to_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # uint8 BGR (N, H, W, 3) -> normalised RGB (N, 3, H, W) in [-1, 1]
    x = x.permute(0, 3, 1, 2).flip(1).float().div_(255.0)
    # contiguous: GFPGAN flattens features with .view(), which channels-last breaks
    return x.sub_(0.5).div_(0.5).to(dtype).contiguous()


def restore(net: nn.Module, crops: Sequence[np.ndarray], budget_mb: int,
            lanes: Lanes | None = None) -> list[np.ndarray]:
    """Restored uint8 BGR faces, one per crop (GFPGANer.enhance's per-face loop, batched).

    GFPGAN networks take [-1, 1] as upstream feeds them; an added face model other than
    GFPGAN (``added.Served``) takes and returns RGB in [0, 1] through spandrel's call.
    """
    if not crops:
        return []
    param = next(net.parameters())
    device, dtype = param.device, param.dtype
    elem = torch.finfo(dtype).bits // 8
    served = isinstance(net, Served)
    per_item = 512 * 512 * 512 * elem if served else gfpgan_bytes(net, elem)
    chunk = chunk_size(budget_mb, per_item)
    items = [torch.from_numpy(c) for c in crops]
    out: list[np.ndarray] = []

    def fwd(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if served:
            y = net(x.permute(0, 3, 1, 2).flip(1).to(dtype).div_(255.0))
            y = y.float().clamp_(0, 1).mul_(255.0).round_()
        else:
            y = net(_to_input(x, dtype), return_rgb=False)[0]
            # tensor2img(min_max=(-1, 1)): clamp, to [0, 1], x255, round, RGB -> BGR
            y = y.float().clamp_(-1, 1).add_(1).div_(2).mul_(255.0).round_()
        return y.flip(1).permute(0, 2, 3, 1).to(torch.uint8).cpu()

    for _, y in forward_chunks(fwd, items, chunk, lanes):
        out.extend(y.numpy())
    return out


def _gaussian_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    import cv2

    k = cv2.getGaussianKernel(101, 11, cv2.CV_64F)[:, 0]
    return torch.from_numpy(k).to(device, dtype)


def _blur(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # cv2.GaussianBlur((101, 101), 11): separable, BORDER_REFLECT_101 (torch's 'reflect')
    n = k.numel()
    x = F.pad(m[:, None], (n // 2, n // 2, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, n))
    x = F.pad(x, (0, 0, n // 2, n // 2), mode="reflect")
    return F.conv2d(x, k.view(1, 1, n, 1))[:, 0]


def paste_masks(net: nn.Module, faces: Sequence[np.ndarray], budget_mb: int,
                pool: Executor | None = None, lanes: Lanes | None = None) -> list[np.ndarray]:
    """facexlib's soft paste mask (512x512 float64 in [0, 1]) of each restored face."""
    if not faces:
        return []
    device = next(net.parameters()).device
    on_gpu = device.type != "cpu"
    # On a GPU the blur runs batched in float32 there; on the CPU OpenCV's float64 blur is
    # both faster than torch's float64 convolution and exactly upstream's.
    kernel = _gaussian_kernel(device, torch.float32) if on_gpu else None
    cmap = _MASK_COLORMAP.to(device, torch.float32 if on_gpu else torch.float64)
    chunk = chunk_size(budget_mb, parse_bytes(net, 4))
    items = [torch.from_numpy(f) for f in faces]
    out: list[np.ndarray] = []

    def fwd(x: torch.Tensor) -> torch.Tensor:
        logits = net(_to_input(x.to(device), torch.float32))[0]
        m = cmap[logits.argmax(dim=1)]
        if kernel is not None:
            m = _blur(_blur(m, kernel), kernel)
        return m.to(torch.float64).cpu()

    for _, m in forward_chunks(fwd, items, chunk, lanes):
        out.extend(m.numpy())
    if not on_gpu:
        out = list(pool.map(_blur_cv2, out)) if pool is not None else [_blur_cv2(m) for m in out]
    for m in out:
        _clear_border(m)
    return [m / 255.0 for m in out]


def _blur_cv2(m: np.ndarray) -> np.ndarray:
    import cv2

    m = cv2.GaussianBlur(m, (101, 101), 11)
    return cv2.GaussianBlur(m, (101, 101), 11)


def _clear_border(m: np.ndarray, thres: int = 10) -> None:
    m[:thres, :] = 0
    m[-thres:, :] = 0
    m[:, :thres] = 0
    m[:, -thres:] = 0
