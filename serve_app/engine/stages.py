"""The staged pipeline: one micro-batch through detect, align, restore, parse, upsample, paste.

In two calls: ``forward`` runs the stages that use the device, ``finish`` the paste, which is
CPU work only, so a caller can hand the device to the next batch while this one pastes
(``run`` is both). Every stage works on all images of the batch at once. A stage that fails
on the batch is re-run image by image, so an error stays with the image that caused it. The
semantics of each option are those of ``upstream.Reference`` (which the equivalence tests hold
us to). The stages know the engine that runs them only as a ``Host`` (``engine.Engine`` is
one), so this module does not import ``engine.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import cv2
import numpy as np
import torch
from torch import nn

from serve_app.config import EngineConfig
from serve_app.engine import detect, paste, paste_device, restore, upsample
from serve_app.engine.catalog import AddedModel
from serve_app.engine.chunks import Lanes, check_stop, stopping
from serve_app.engine.pixels import check_image, to_8bit
from serve_app.engine.types import EnhanceResult
from serve_app.errors import Abandoned, PhotoEnhanceError, engine_error
from serve_app.options import EnhanceOptions

LOGGER = logging.getLogger(__name__)
DETECTOR = "detection_Resnet50_Final"
PARSER = "parsing_parsenet"


class Host(Protocol):
    """What the stages use of the engine that runs them: its settings, device and networks,
    the model keys an option names, and ``fault``, which a stage sets on a CUDA fault."""

    fault: str | None

    @property
    def cfg(self) -> EngineConfig: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def budget_mb(self) -> int: ...

    @property
    def lanes(self) -> Lanes | None: ...

    @property
    def paste_on_device(self) -> bool: ...

    def check(self, opt: EnhanceOptions) -> None: ...

    def net(self, name: str) -> nn.Module: ...

    def bg_key(self, opt: EnhanceOptions) -> str: ...

    def added_model(self, name: str) -> AddedModel | None: ...

    def scale(self, key: str) -> int: ...


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # OpenCV releases the GIL: warps and blends of different images overlap.
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="engine-cpu")


@dataclass
class BatchItem:
    """One image of a micro-batch on its way through the stages."""

    src: np.ndarray
    opt: EnhanceOptions
    timings: dict[str, float] = field(default_factory=dict)
    error: PhotoEnhanceError | None = None
    work: np.ndarray | None = None  # 8-bit BGR/BGRA image of the face path
    bit16: bool = False
    gray: bool = False
    crops: list[np.ndarray] = field(default_factory=list)
    affines: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)  # detector's x0 y0 x1 y1, input px
    restored: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    background: np.ndarray | None = None
    result: np.ndarray | None = None
    paste_device: torch.device | None = None  # where paste warps and blends; None: OpenCV

    @property
    def pastes(self) -> bool:
        return self.opt.face and not self.opt.aligned


def _prepare(engine: Host, item: BatchItem) -> None:
    item.src = check_image(item.src)
    engine.check(item.opt)
    if not item.opt.face:
        return
    img = item.src
    # With faces on, 16-bit images are processed at 8 bits (see upstream.Reference).
    if img.dtype == np.uint16:
        item.bit16, img = True, to_8bit(img)
    if img.ndim == 2:
        item.gray, img = True, cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    item.work = img
    if item.opt.aligned:
        item.crops = [cv2.resize(np.ascontiguousarray(img[:, :, :3]), (512, 512))]


def _detect(engine: Host, items: list[BatchItem]) -> None:
    todo = [j for j in items if j.pastes]
    if not todo:
        return
    bgrs = [np.ascontiguousarray(j.work[:, :, :3]) for j in todo]
    dets = detect.detect(engine.net(DETECTOR), bgrs, engine.cfg.det_threshold,
                         engine.budget_mb, engine.lanes)
    found = [detect.select(d, b.shape[0], b.shape[1], j.opt.only_center_face)
             for d, b, j in zip(dets, bgrs, todo, strict=True)]
    work = [(j, b, f) for j, b, fs in zip(todo, bgrs, found, strict=True) for f in fs]
    for (j, _, (_, box)), crop_aff in zip(
            work, _pool().map(lambda w: detect.align(w[1], w[2][0]), work), strict=True):
        j.crops.append(crop_aff[0])
        j.affines.append(crop_aff[1])
        j.boxes.append(box)


def _restore(engine: Host, items: list[BatchItem]) -> None:
    by_model: dict[str, list[BatchItem]] = defaultdict(list)
    for j in items:
        if j.crops:
            by_model[j.opt.face_model].append(j)
    for model, group in by_model.items():
        crops = [c for j in group for c in j.crops]
        faces = restore.restore(engine.net(model), crops, engine.budget_mb, engine.lanes)
        k = 0
        for j in group:
            j.restored, k = faces[k : k + len(j.crops)], k + len(j.crops)


def _parse(engine: Host, items: list[BatchItem]) -> None:
    group = [j for j in items if j.pastes and j.restored]
    if not group or not engine.cfg.use_parse:
        return
    faces = [f for j in group for f in j.restored]
    masks = restore.paste_masks(engine.net(PARSER), faces, engine.budget_mb, _pool(),
                                engine.lanes)
    k = 0
    for j in group:
        j.masks, k = masks[k : k + len(j.restored)], k + len(j.restored)


def _bg_request(engine: Host, j: BatchItem) -> upsample.Request | None:
    name = engine.bg_key(j.opt)
    if name == "none" or (j.opt.face and j.opt.aligned):
        return None
    img = j.work if j.opt.face else j.src
    tile = j.opt.tile or engine.cfg.tile
    added = engine.added_model(name)
    if added is not None and added.tiling == "internal":
        tile = max(img.shape[:2])  # the model tiles itself; the device-fit retry still halves
    return upsample.Request(img, name, j.opt.upscale, tile)


def _upsample(engine: Host, items: list[BatchItem]) -> None:
    reqs, owners = [], []
    for j in items:
        r = _bg_request(engine, j)
        if r is not None:
            reqs.append(r)
            owners.append(j)
        elif not (j.opt.face and j.opt.aligned):
            img = j.work[:, :, :3] if j.opt.face else j.src
            h, w = img.shape[:2]
            j.background = cv2.resize(img, (w * j.opt.upscale, h * j.opt.upscale),
                                      interpolation=cv2.INTER_LANCZOS4)
    if not reqs:
        return
    names = {r.model for r in reqs}
    nets = {n: engine.net(n) for n in names}
    scales = {n: engine.scale(n) for n in names}
    # Upstream's mod pad is for its RRDBNet; added models pad to their own size needs.
    unpadded = {n for n in names if engine.added_model(n) is not None}
    cfg = engine.cfg
    outs = upsample.upsample(nets, scales, reqs, tile_pad=cfg.tile_pad, pre_pad=cfg.pre_pad,
                             budget_mb=engine.budget_mb, no_mod_pad=unpadded,
                             lanes=engine.lanes)
    for j, out in zip(owners, outs, strict=True):
        if isinstance(out, PhotoEnhanceError):
            j.error = out
        else:
            j.background = out


def _finish_one(j: BatchItem) -> None:
    opt = j.opt
    if not opt.face:
        j.result = j.background
        return
    alpha = j.work[:, :, 3] if j.work.ndim == 3 and j.work.shape[2] == 4 else None
    if opt.aligned:
        out = j.restored[0]
        if opt.upscale != 1:
            out = cv2.resize(out, (512 * opt.upscale, 512 * opt.upscale),
                             interpolation=cv2.INTER_LANCZOS4)
    else:
        masks = j.masks or [_square_mask()] * len(j.restored)
        faces = [paste.Face(r, a, m) for r, a, m in zip(j.restored, j.affines, masks, strict=True)]
        # a copy (0.3 ms at 1024 px), not the background itself: a stage that fails on the
        # batch is re-run item by item, and must find the backgrounds unpasted
        if j.paste_device is not None:
            out = paste_device.paste(j.background, faces, opt.upscale, j.paste_device)
        else:
            out = paste.paste(j.background, faces, opt.upscale)
    if j.gray:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    elif alpha is not None and out.shape[2] == 3:
        h, w = out.shape[:2]
        out = np.dstack([out, cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)])
    if j.bit16:
        out = out.astype(np.uint16) * 257
    j.result = out


@lru_cache(maxsize=1)
def _square_mask() -> np.ndarray:
    # use_parse off: a flat mask with facexlib's 10 px black border removed
    m = np.ones((512, 512), np.float64)
    m[:10], m[-10:], m[:, :10], m[:, -10:] = 0, 0, 0, 0
    return m


def _finish(engine: Host, items: list[BatchItem]) -> None:
    for j in items:
        j.paste_device = engine.device if engine.paste_on_device else None
    list(_pool().map(_finish_one, items))


# The stages that use the device; paste (``finish``) comes after, on the CPU alone.
_DEVICE_STAGES: list[tuple[str, Callable[[Host, list[BatchItem]], None]]] = [
    ("detect", _detect),
    ("restore", _restore),
    ("parse", _parse),
    ("upsample", _upsample),
]


def _failure(engine: Host, exc: Exception) -> PhotoEnhanceError:
    """The image's error; a CUDA fault also marks the engine (its ``fault``): the device is
    unusable for every later image, not only this one."""
    if "cuda error" in str(exc).lower():
        engine.fault = str(exc)[:200]
    return engine_error(exc, "engine stage failed")


def _run_stage(engine: Host, name: str, fn, items: list[BatchItem]) -> None:
    t0 = time.perf_counter()
    try:
        check_stop()
        fn(engine, items)
    except Abandoned as exc:  # no one waits for these images: nothing to isolate
        for j in items:
            j.error = exc
        return
    except Exception as exc:
        if len(items) == 1:
            items[0].error = _failure(engine, exc)
        else:
            # Isolate the culprit: the same stage, image by image.
            LOGGER.warning("stage %s failed on a batch of %d (%s); retrying one by one",
                           name, len(items), exc)
            for j in items:
                _run_stage(engine, name, fn, [j])
            return
    dt = time.perf_counter() - t0
    for j in items:
        j.timings[name] = j.timings.get(name, 0.0) + dt


@dataclass
class Staged:
    """A batch between ``forward`` and ``finish``: its items and the seconds spent so far."""

    items: list[BatchItem]
    seconds: float

    @classmethod
    def failed(cls, images: Sequence[np.ndarray], options: Sequence[EnhanceOptions],
               error: PhotoEnhanceError) -> Staged:
        """Images whose device stages could not run: ``finish`` passes ``error`` on."""
        return cls([BatchItem(src=img, opt=opt, error=error)
                    for img, opt in zip(images, options, strict=True)], 0.0)


def run(engine: Host, images: list[np.ndarray], options: list[EnhanceOptions]):
    return finish(engine, forward(engine, images, options))


def forward(engine: Host, images: list[np.ndarray], options: list[EnhanceOptions],
            stop: threading.Event | None = None) -> Staged:
    """Check, detect, restore, parse, upsample: every stage that uses the device. Once
    ``stop`` is set, the rest of the batch fails with ``Abandoned`` at its next chunk."""
    items = [BatchItem(src=img, opt=opt) for img, opt in zip(images, options, strict=True)]
    t0 = time.perf_counter()
    for j in items:
        try:
            _prepare(engine, j)
        except Exception as exc:
            j.error = _failure(engine, exc)
    with torch.inference_mode(), stopping(stop):
        for name, fn in _DEVICE_STAGES:
            live = [j for j in items if j.error is None]
            if live:
                _run_stage(engine, name, fn, live)
    return Staged(items, time.perf_counter() - t0)


def finish(engine: Host, staged: Staged) -> list[EnhanceResult | PhotoEnhanceError]:
    """Paste the faces and make the results: CPU work, no device."""
    items = staged.items
    t0 = time.perf_counter()
    live = [j for j in items if j.error is None]
    if live:
        _run_stage(engine, "paste", _finish, live)
    total = staged.seconds + time.perf_counter() - t0
    out: list[EnhanceResult | PhotoEnhanceError] = []
    for j in items:
        if j.error is not None:
            out.append(j.error)
        else:
            j.timings["total"] = total
            out.append(EnhanceResult(j.result, len(j.restored) if j.pastes else int(j.opt.face),
                                     j.timings, _face_boxes(j)))
    return out


def _face_boxes(j: BatchItem) -> list[tuple[int, int, int, int]]:
    """Where the restored faces are in the output: (x, y, width, height) in its pixels, one
    per face. Not clipped: a detector's box may reach past the edges (its face is restored
    and pasted all the same), so a box can start below 0 or end past the output's size."""
    if j.opt.face and j.opt.aligned:
        h, w = j.result.shape[:2]
        return [(0, 0, w, h)]  # the whole input is the face
    s = j.opt.upscale
    out = []
    for x0, y0, x1, y1 in j.boxes:
        left, top = int(np.floor(x0 * s)), int(np.floor(y0 * s))
        out.append((left, top, int(np.ceil(x1 * s)) - left, int(np.ceil(y1 * s)) - top))
    return out
