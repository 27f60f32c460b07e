"""Real-ESRGAN over the tiles of many images at once, equal to ``RealESRGANer.enhance``.

Each image is padded and cut exactly as upstream cuts it (same tile, tile_pad, pre_pad,
mod-pad); tiles of the same model and shape, from any image, go through one chunked
forward; outputs are assembled on the CPU, so the device holds only the chunk in flight.
An image whose single tile does not fit is re-tiled at half the tile size; below 32 px it
fails alone with ``ImageTooLargeForDevice``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serve_app.engine.chunks import (
    ItemTooLarge,
    Lanes,
    by_group,
    chunk_size,
    forward_chunks,
    sr_bytes,
)
from serve_app.errors import ImageTooLargeForDevice

MIN_TILE = 32


@dataclass
class Request:
    img: np.ndarray  # as RealESRGANer.enhance takes it: gray, BGR or BGRA; uint8 or uint16
    model: str
    outscale: int
    tile: int


@dataclass
class _Plane:
    """One 3-channel float plane (the image, or its alpha as gray RGB) being upsampled."""

    req: int
    x: torch.Tensor  # (3, H, W) padded input, float32, CPU
    out: torch.Tensor = field(default=None)  # (3, H*s, W*s)  # type: ignore[assignment]
    pad: tuple[int, int] = (0, 0)  # mod pad (h, w)


def _prepare(r: Request, scale: int, pre_pad: int, mod_pad: bool) -> tuple[list[_Plane], dict]:
    img = r.img.astype(np.float32)
    # By dtype (upstream guesses from max > 256, which misreads dark 16-bit images).
    max_range = 65535.0 if r.img.dtype == np.uint16 else 255.0
    img = img / max_range
    meta = {"h": r.img.shape[0], "w": r.img.shape[1], "max_range": max_range, "mode": "RGB"}
    planes_np = []
    if img.ndim == 2:
        meta["mode"] = "L"
        planes_np.append(cv2.cvtColor(img, cv2.COLOR_GRAY2RGB))
    elif img.shape[2] == 4:
        meta["mode"] = "RGBA"
        planes_np.append(cv2.cvtColor(img[:, :, 0:3], cv2.COLOR_BGR2RGB))
        planes_np.append(cv2.cvtColor(img[:, :, 3], cv2.COLOR_GRAY2RGB))
    else:
        planes_np.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    planes = []
    for p in planes_np:
        x = torch.from_numpy(np.transpose(p, (2, 0, 1))).float()[None]
        if pre_pad:
            x = F.pad(x, (0, pre_pad, 0, pre_pad), "reflect")
        mod = {2: 2, 1: 4}.get(scale) if mod_pad else None
        ph = pw = 0
        if mod is not None:
            h, w = x.shape[2:]
            ph, pw = (mod - h % mod) % mod, (mod - w % mod) % mod
            x = F.pad(x, (0, pw, 0, ph), "reflect")
        planes.append(_Plane(req=-1, x=x[0], pad=(ph, pw)))
    return planes, meta


def _tiles(h: int, w: int, tile: int, pad: int, scale: int):
    """Upstream's tile_process geometry: (input slice, output slice, slice within tile)."""
    for y in range(math.ceil(h / tile)):
        for x in range(math.ceil(w / tile)):
            x0, y0 = x * tile, y * tile
            x1, y1 = min(x0 + tile, w), min(y0 + tile, h)
            x0p, x1p = max(x0 - pad, 0), min(x1 + pad, w)
            y0p, y1p = max(y0 - pad, 0), min(y1 + pad, h)
            src = (slice(y0p, y1p), slice(x0p, x1p))
            dst = (slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))
            ty, tx = (y0 - y0p) * scale, (x0 - x0p) * scale
            sub = (slice(ty, ty + (y1 - y0) * scale), slice(tx, tx + (x1 - x0) * scale))
            yield src, dst, sub


def _finish(planes: list[_Plane], meta: dict, scale: int, pre_pad: int, outscale: int) -> np.ndarray:
    outs = []
    for p in planes:
        o = p.out
        h, w = o.shape[1:]
        ph, pw = p.pad
        o = o[:, 0 : h - ph * scale, 0 : w - pw * scale]
        if pre_pad:
            h, w = o.shape[1:]
            o = o[:, 0 : h - pre_pad * scale, 0 : w - pre_pad * scale]
        o = o.clamp_(0, 1).numpy()
        outs.append(np.transpose(o[[2, 1, 0], :, :], (1, 2, 0)))
    img = outs[0]
    if meta["mode"] == "L":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif meta["mode"] == "RGBA":
        alpha = cv2.cvtColor(outs[1], cv2.COLOR_BGR2GRAY)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
        img[:, :, 3] = alpha
    if meta["max_range"] == 65535.0:
        out = (img * 65535.0).round().astype(np.uint16)
    else:
        out = (img * 255.0).round().astype(np.uint8)
    if outscale != scale:
        out = cv2.resize(out, (int(meta["w"] * outscale), int(meta["h"] * outscale)),
                         interpolation=cv2.INTER_LANCZOS4)
    return out


def _run_tiles(nets: dict[str, nn.Module], scales: dict[str, int], groups: dict, budget_mb: int,
               lanes: Lanes | None = None) -> set[int]:
    """Forward every tile group (one model and tile size), chunked within ``budget_mb``, each
    tile written into its plane's output; the requests one of whose tiles did not fit the
    device alone, whose remaining tiles are skipped."""
    failed: set[int] = set()

    def group(key_tiles: tuple[tuple[str, int, int], list], lanes: Lanes | None) -> None:
        (model, th, tw), tiles = key_tiles
        net = nets[model]
        param = next(net.parameters())
        device, dtype = param.device, param.dtype
        elem = torch.finfo(dtype).bits // 8
        chunk = chunk_size(budget_mb, sr_bytes(net, th, tw, scales[model], elem))
        pending = [t for t in tiles if t[0].req not in failed]
        while pending:
            items = [p.x[:, src[0], src[1]] for p, src, _, _ in pending]

            def fwd(x: torch.Tensor, net=net, device=device, dtype=dtype) -> torch.Tensor:
                return net(x.to(device, dtype)).float().cpu()

            done = 0
            try:
                for start, y in forward_chunks(fwd, items, chunk, lanes):
                    for k in range(y.shape[0]):
                        p, _, dst, sub = pending[start + k]
                        p.out[:, dst[0], dst[1]] = y[k][:, sub[0], sub[1]]
                    done = start + y.shape[0]
                pending = []
            except ItemTooLarge as exc:
                bad = pending[done + exc.index][0].req
                failed.add(bad)
                pending = [t for t in pending[done:] if t[0].req != bad]

    # Groups side by side write different tiles' pixels; one request's tiles may sit in
    # several groups, each marking it failed on its own.
    by_group(group, list(groups.items()), lanes)
    return failed


def upsample(
    nets: dict[str, nn.Module], scales: dict[str, int], reqs: list[Request], *,
    tile_pad: int, pre_pad: int, budget_mb: int, no_mod_pad: set[str] | frozenset[str] = frozenset(),
    lanes: Lanes | None = None,
) -> list[np.ndarray | ImageTooLargeForDevice]:
    """``RealESRGANer.enhance(img, outscale)`` for every request, tiles batched across them.

    Inputs go to each network in its parameters' dtype (fp16 or fp32). ``no_mod_pad`` names
    the networks that pad to their own size requirements (added models).
    """
    results: list[np.ndarray | ImageTooLargeForDevice | None] = [None] * len(reqs)
    planes: list[_Plane] = []
    metas: dict[int, dict] = {}
    # (model, tile h, tile w) -> list of (plane, src, dst, sub)
    groups: dict[tuple[str, int, int], list] = defaultdict(list)
    for i, r in enumerate(reqs):
        scale = scales[r.model]
        ps, metas[i] = _prepare(r, scale, pre_pad, r.model not in no_mod_pad)
        for p in ps:
            p.req = i
            h, w = p.x.shape[1:]
            p.out = torch.zeros((3, h * scale, w * scale), dtype=torch.float32)
            planes.append(p)
            for src, dst, sub in _tiles(h, w, r.tile, tile_pad, scale):
                th, tw = src[0].stop - src[0].start, src[1].stop - src[1].start
                groups[(r.model, th, tw)].append((p, src, dst, sub))
    failed = _run_tiles(nets, scales, groups, budget_mb, lanes)
    for i, r in enumerate(reqs):
        if i in failed:
            continue
        ps = [p for p in planes if p.req == i]
        results[i] = _finish(ps, metas[i], scales[r.model], pre_pad, r.outscale)
    retry = [i for i in sorted(failed)]
    for i in retry:
        r = reqs[i]
        if r.tile // 2 < MIN_TILE:
            results[i] = ImageTooLargeForDevice(
                f"{r.img.shape[1]}x{r.img.shape[0]} does not fit the device even with "
                f"{r.tile}px tiles", tile=r.tile,
            )
            continue
        smaller = Request(r.img, r.model, r.outscale, r.tile // 2)
        results[i] = upsample(nets, scales, [smaller], tile_pad=tile_pad, pre_pad=pre_pad,
                              budget_mb=budget_mb, no_mod_pad=no_mod_pad, lanes=lanes)[0]
    return results  # type: ignore[return-value]
