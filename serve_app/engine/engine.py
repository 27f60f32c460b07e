"""The engine: weights in, enhanced images out. No Ray, no HTTP.

``Engine`` holds the loaded networks; ``Engine.enhance_batch`` hands the images of one
micro-batch to the staged pipeline (``serve_app.engine.stages``) and returns one result or
one error per image; a bad image never fails the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import serve_app.engine.compat  # noqa: F401
from serve_app.config import AppConfig, EngineConfig
from serve_app.engine import models, stages
from serve_app.engine.catalog import AddedModel, Catalog
from serve_app.engine.chunks import Lanes
from serve_app.engine.types import EnhanceResult
from serve_app.engine.weights import REGISTRY, LoadedWeightsInfo, spec
from serve_app.engine.weights_folder import resolve
from serve_app.errors import EngineFailure, InvalidOption, PhotoEnhanceError
from serve_app.options import DENOISE_MODEL, EnhanceOptions

LOGGER = logging.getLogger(__name__)

CPU_BUDGET_MB = 64
WDN_MODEL = "realesr-general-wdn-x4v3"
_DENOISE_SEP = "@denoise="


def pick_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EngineFailure("engine.device is 'cuda' but no CUDA device is available")
    return torch.device(cfg.device)


class Engine:
    """Loaded networks plus the batched pipeline. Stateless between calls, thread-safe."""

    def __init__(
        self, cfg: EngineConfig, weights: LoadedWeightsInfo, added: Catalog | None = None
    ) -> None:
        self.cfg = cfg
        self.weights = weights
        self.added = added or Catalog(None)  # models added with `photoenhance models add`
        self.device = pick_device(cfg)
        # fp16 only on CUDA: the CPU path stays fp32 (and is the one equal to upstream).
        self.dtype = torch.float16 if (cfg.half and self.device.type == "cuda") else torch.float32
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        lanes = cfg.cpu_lanes or torch.get_num_threads()
        self.lanes = Lanes(lanes) if self.device.type == "cpu" and lanes > 1 else None
        self._nets: dict[str, nn.Module] = {}
        self._lock = threading.Lock()
        # Set when a stage met a CUDA fault (the device is unusable until the process
        # restarts): a model replica's health check fails on it, and Serve replaces it.
        self.fault: str | None = None

    @property
    def paste_on_device(self) -> bool:
        """Whether paste warps and blends on the device (``engine.paste_on_device``; by
        default on a GPU only: on the CPU, OpenCV's path is the cheaper one)."""
        if self.cfg.paste_on_device is None:
            return self.device.type == "cuda"
        return self.cfg.paste_on_device

    @property
    def budget_mb(self) -> int:
        """Activation memory per forward. On a CPU, big chunks fall out of cache: measured on
        the tiny profile, GFPGAN takes 0.14 s/face alone and 0.20 s/face sixteen at a time,
        ParseNet 0.23 and 0.44; so the CPU keeps chunks near one item."""
        if self.device.type == "cpu":
            return min(self.cfg.memory_budget_mb, CPU_BUDGET_MB)
        return self.cfg.memory_budget_mb

    @classmethod
    def from_config(cls, app_config: AppConfig) -> Engine:
        return cls(app_config.engine, resolve(app_config.weights),
                   Catalog(app_config.weights.added_location))

    @property
    def synthetic(self) -> bool:
        return self.weights.synthetic

    def uses_synthetic(self, opt: EnhanceOptions) -> bool:
        """Whether a request with ``opt`` runs any synthetic network: a built-in one while the
        weights folder is synthetic. Added models are the operator's own files, and
        ``face=false&bg_model=none`` runs no network at all (see stages.py for what runs)."""
        if not self.synthetic:
            return False
        if opt.face and (not opt.aligned or self.added_model(opt.face_model) is None):
            return True  # the detector and parser are built-in; so may the face model be
        bg = self.bg_key(opt)
        bg_runs = bg != "none" and not (opt.face and opt.aligned)
        return bg_runs and self.added_model(bg) is None

    def net(self, name: str) -> nn.Module:
        """Network ``name``, loaded once (lazily) and shared by every call."""
        net = self._nets.get(name)
        if net is not None:
            return net
        with self._lock:
            if name not in self._nets:
                self._nets[name] = self._load(name)
            return self._nets[name]

    # ------------------------------------------------------------------ model keys
    # A key names one loaded network: a built-in name, an added model's name, or the
    # denoise blend "realesr-general-x4v3@denoise=0.35" (one network per 0.05 step).

    def added_model(self, name: str) -> AddedModel | None:
        if name in REGISTRY:
            return None
        return self.added.get(name)

    def check(self, opt: EnhanceOptions) -> None:
        """Refuse (422) what this engine cannot run: unknown added models, wrong kinds, a
        denoise strength without the wdn weights."""
        self.added.check(opt)
        if opt.denoise is not None and opt.denoise != 1.0 and WDN_MODEL not in self.weights.files:
            raise InvalidOption(
                f"denoise: this server has no {WDN_MODEL} weights to blend with",
                field="denoise", code="option_unavailable",
            )

    def bg_key(self, opt: EnhanceOptions) -> str:
        name = opt.resolved_bg_model()
        if name == DENOISE_MODEL and opt.denoise is not None and opt.denoise != 1.0:
            return f"{name}{_DENOISE_SEP}{opt.denoise:.2f}"
        return name

    def scale(self, key: str) -> int:
        added = self.added_model(key)
        return added.scale if added is not None else spec(key.split(_DENOISE_SEP)[0]).scale

    def _load(self, name: str) -> nn.Module:
        if _DENOISE_SEP in name:
            return self._load_blend(name)
        added = self.added_model(name)
        if added is not None:
            return self._load_added(added)
        kind = spec(name).kind
        net = models.build(name, self.weights, self.device, self.dtype)
        # channels-last helps the plain conv stacks; GFPGAN .view()s its features, so not it.
        # On the CPU (oneDNN) it also speeds up ParseNet: both 1.2x (tiny profile, in lanes;
        # loadtests/lanes_bench.py).
        if self.cfg.channels_last and (
                kind == "bg" or (kind == "parse" and self.device.type == "cpu")):
            net = net.to(memory_format=torch.channels_last)
        if self.cfg.compile and self.device.type == "cuda" and kind in ("face", "bg"):
            net = torch.compile(net, dynamic=True)
        return net

    def _load_blend(self, key: str) -> nn.Module:
        """Upstream's ``dni``: ``strength * plain + (1 - strength) * wdn``, in fp32 on the CPU
        (as ``RealESRGANer.dni`` computes it), then moved and cast like the plain network."""
        name, strength = key.split(_DENOISE_SEP)
        w = float(strength)
        plain = models.load_state(self.weights.path(name), spec(name))
        wdn = models.load_state(self.weights.path(WDN_MODEL), spec(WDN_MODEL))
        blended = {k: w * v + (1 - w) * wdn[k] for k, v in plain.items()}
        net = models.construct(spec(name), self.weights.profile)
        net.load_state_dict(blended, strict=True)
        net.eval().requires_grad_(False)
        net = net.to(device=self.device, dtype=self.dtype)
        if self.cfg.channels_last and self.device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        LOGGER.info("blended %s with %s at denoise %s", name, WDN_MODEL, strength)
        return net

    def _load_added(self, model: AddedModel) -> nn.Module:
        from serve_app.engine import added, catalog

        data = catalog.read_file(self.added.location, model)
        net = added.build(model, data, self.device, self.dtype)
        LOGGER.info("loaded added model %s (%s x%d)", model.name, model.arch, model.scale)
        return net

    def info(self) -> dict[str, Any]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "device": str(self.device),
            "device_name": name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "synthetic": self.synthetic,
            "profile": self.weights.profile,
            "weights_dir": str(self.weights.dir),
            "loaded_models": sorted(self._nets),
            "added_models": self.added.listing(),
            "tile": self.cfg.tile,
            "tile_pad": self.cfg.tile_pad,
            "pre_pad": self.cfg.pre_pad,
            "memory_budget_mb": self.budget_mb,
            "det_threshold": self.cfg.det_threshold,
        }

    def warmup(self, options: Sequence[EnhanceOptions] | None = None) -> None:
        """Load the default networks and run one small image through them."""
        t0 = time.perf_counter()
        opts = list(options or [EnhanceOptions()])
        img = np.full((64, 64, 3), 128, np.uint8)
        for res in self.enhance_batch([img] * len(opts), opts):
            if isinstance(res, PhotoEnhanceError):
                raise res
        LOGGER.info("engine warm-up took %.2fs (%s)", time.perf_counter() - t0, self.info())

    def enhance_batch(
        self, images: Sequence[np.ndarray], options: Sequence[EnhanceOptions]
    ) -> list[EnhanceResult | PhotoEnhanceError]:
        return self.finish_batch(self.forward_batch(images, options))

    def forward_batch(
        self, images: Sequence[np.ndarray], options: Sequence[EnhanceOptions],
        stop: threading.Event | None = None,
    ) -> stages.Staged:
        """The device's part of ``enhance_batch``; ``finish_batch`` (CPU only) completes it, so
        a caller may run the next batch's ``forward_batch`` meanwhile. Setting ``stop`` ends
        it at the next chunk, every image still in it failing with ``Abandoned``."""
        if len(images) != len(options):
            raise ValueError(f"{len(images)} images but {len(options)} options")
        return stages.forward(self, list(images), list(options), stop)

    def finish_batch(self, staged: stages.Staged) -> list[EnhanceResult | PhotoEnhanceError]:
        """Paste and results of a ``forward_batch``: CPU work only."""
        return stages.finish(self, staged)

    @staticmethod
    def staged_failure(images: Sequence[np.ndarray], options: Sequence[EnhanceOptions],
                       error: PhotoEnhanceError) -> stages.Staged:
        """In place of a ``forward_batch`` that raised: ``finish_batch`` then returns
        ``error`` for each image."""
        return stages.Staged.failed(images, options, error)
