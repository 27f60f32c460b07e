"""Upstream GFPGANer / RealESRGANer built on our networks: the reference the engine must equal.

Used by ``verify-upstream``, ``bench`` and the equivalence tests. Upstream's constructors
download weights and hard-code the full architectures, so the helpers are assembled with
``__new__`` around networks built by ``models.build`` from the same files; every method
that does the work (``enhance``, ``FaceRestoreHelper``'s detect/align/paste) is upstream's.

Upstream objects keep per-image state: build one per thread (``Reference`` does, per call).
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import torch
from torch import nn

import serve_app.engine.compat  # noqa: F401
from serve_app.engine import models
from serve_app.engine.pixels import to_8bit
from serve_app.engine.weights import LoadedWeightsInfo, spec
from serve_app.options import EnhanceOptions


def realesrganer(net: nn.Module, scale: int, *, tile: int, tile_pad: int, pre_pad: int,
                 device: torch.device, half: bool = False):
    from realesrgan import RealESRGANer

    r = RealESRGANer.__new__(RealESRGANer)
    r.scale, r.tile_size, r.tile_pad, r.pre_pad = scale, tile, tile_pad, pre_pad
    r.mod_scale, r.half, r.device, r.model = None, half, device, net
    return r


def face_helper(det: nn.Module, parse: nn.Module, upscale: float, device: torch.device):
    from facexlib.utils.face_restoration_helper import FaceRestoreHelper

    h = FaceRestoreHelper.__new__(FaceRestoreHelper)
    # The attribute values FaceRestoreHelper.__init__ sets for GFPGANer's arguments.
    h.template_3points, h.upscale_factor, h.crop_ratio = False, upscale, (1, 1)
    h.face_size = (512, 512)
    h.face_template = np.array(
        [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
         [201.26117, 371.41043], [313.08905, 371.15118]]
    )
    h.save_ext, h.pad_blur, h.device = "png", False, device
    h.face_det, h.use_parse, h.face_parse = det, True, parse
    h.clean_all()
    return h


def gfpganer(gfpgan: nn.Module, det: nn.Module, parse: nn.Module, upscale: float,
             bg_upsampler, device: torch.device):
    from gfpgan import GFPGANer

    g = GFPGANer.__new__(GFPGANer)
    g.upscale, g.bg_upsampler, g.device, g.gfpgan = upscale, bg_upsampler, device, gfpgan
    g.face_helper = face_helper(det, parse, upscale, device)
    return g


class Reference:
    """Upstream's one-image-at-a-time pipeline with this engine's option semantics."""

    def __init__(self, info: LoadedWeightsInfo, *, device: str | torch.device = "cpu",
                 tile: int = 512, tile_pad: int = 10, pre_pad: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        self.info, self.device, self.dtype = info, torch.device(device), dtype
        self.tile, self.tile_pad, self.pre_pad = tile, tile_pad, pre_pad
        self._nets: dict[str, nn.Module] = {}
        self._lock = threading.Lock()
        # RetinaFace.detect_faces stores per-call values on the module: one caller at a time.
        self.detect_lock = threading.Lock()

    @classmethod
    def sharing(cls, engine) -> Reference:
        """A reference that uses ``engine``'s networks (no second copy of the weights)."""
        ref = cls.alongside(engine)
        ref.net = engine.net  # type: ignore[method-assign]
        return ref

    @classmethod
    def alongside(cls, engine) -> Reference:
        """A reference with its own networks, laid out as upstream lays them out (the
        engine's may be channels-last or compiled), in the engine's dtype for the face and
        background models: what ``photoenhance bench`` times the engine against."""
        cfg = engine.cfg
        return cls(engine.weights, device=engine.device, tile=cfg.tile, tile_pad=cfg.tile_pad,
                   pre_pad=cfg.pre_pad, dtype=engine.dtype)

    def net(self, name: str) -> nn.Module:
        with self._lock:
            if name not in self._nets:
                self._nets[name] = models.build(name, self.info, self.device, self.dtype)
            return self._nets[name]

    def bg(self, name: str, tile: int = 0):
        return realesrganer(self.net(name), spec(name).scale, tile=tile or self.tile,
                            tile_pad=self.tile_pad, pre_pad=self.pre_pad, device=self.device)

    def enhance(self, img: np.ndarray, opt: EnhanceOptions) -> tuple[np.ndarray, int]:
        """(output, faces) for one image, the way upstream's CLIs would produce it."""
        bg_name = opt.resolved_bg_model()
        bg = None if bg_name == "none" else self.bg(bg_name, opt.tile)
        if not opt.face:
            if bg is None:
                h, w = img.shape[:2]
                return cv2.resize(img, (w * opt.upscale, h * opt.upscale),
                                  interpolation=cv2.INTER_LANCZOS4), 0
            return bg.enhance(img, outscale=opt.upscale)[0], 0
        if img.dtype == np.uint16:
            # Upstream pastes 8-bit faces into a 16-bit canvas unscaled (dark faces); with
            # faces on, 16-bit inputs are processed at 8 bits and scaled back.
            out, faces = self.enhance(to_8bit(img), opt)
            return out.astype(np.uint16) * 257, faces
        g = gfpganer(self.net(opt.face_model), self.net("detection_Resnet50_Final"),
                     self.net("parsing_parsenet"), opt.upscale, bg, self.device)
        gray = img.ndim == 2
        alpha = img[:, :, 3] if img.ndim == 3 and img.shape[2] == 4 else None
        # GFPGAN's CLI reads every input as 3-channel BGR; gray goes through it that way.
        src = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if gray else img
        if opt.aligned:
            bgr = src[:, :, :3]
            _, restored, _ = g.enhance(bgr, has_aligned=True, weight=opt.weight)
            out = restored[0]
            if opt.upscale != 1:
                out = cv2.resize(out, (512 * opt.upscale, 512 * opt.upscale),
                                 interpolation=cv2.INTER_LANCZOS4)
            faces = 1
        else:
            if alpha is not None and bg is None:
                src = src[:, :, :3]
            with self.detect_lock:
                _, restored, out = g.enhance(src, has_aligned=False, paste_back=True,
                                             only_center_face=opt.only_center_face,
                                             weight=opt.weight)
            faces = len(restored)
        if gray:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
        elif alpha is not None and out.ndim == 3 and out.shape[2] == 3:
            h, w = out.shape[:2]
            out = np.dstack([out, cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)])
        return out, faces
