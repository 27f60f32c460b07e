"""The model factory: a network from a registry name, loaded strictly. No guessing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import torch
from torch import nn

import serve_app.engine.compat  # noqa: F401  (before basicsr, gfpgan, realesrgan, facexlib)
from serve_app.engine import checkpoint
from serve_app.engine.weights import LoadedWeightsInfo, WeightSpec, spec
from serve_app.errors import WeightsError

LOGGER = logging.getLogger(__name__)


def _gfpgan(**kw: Any) -> nn.Module:
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    return GFPGANv1Clean(**kw)


def _rrdb(**kw: Any) -> nn.Module:
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet(**kw)


def _srvgg(**kw: Any) -> nn.Module:
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return SRVGGNetCompact(**kw)


def _retinaface(**kw: Any) -> nn.Module:
    from facexlib.detection.retinaface import RetinaFace

    # RetinaFace moves itself to a device in __init__; build on the CPU, move later.
    return RetinaFace(half=False, device=torch.device("cpu"), **kw)


def _parsenet(**kw: Any) -> nn.Module:
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(**kw)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "GFPGANv1Clean": _gfpgan,
    "RRDBNet": _rrdb,
    "SRVGGNetCompact": _srvgg,
    "RetinaFace": _retinaface,
    "ParseNet": _parsenet,
}


def construct(s: WeightSpec, profile: str) -> nn.Module:
    """An untrained network of ``s``'s architecture at ``profile`` widths."""
    try:
        factory = ARCHS[s.arch]
    except KeyError:
        raise WeightsError(f"no architecture {s.arch!r} for {s.name}") from None
    return factory(**s.kwargs(profile))  # type: ignore[arg-type]


def load_state(path: Any, s: WeightSpec) -> dict[str, torch.Tensor]:
    """The state dict in a file, unwrapped the way upstream does (params_ema first). Read as
    tensors only (``engine.checkpoint``): the weights folder may hold a file someone put
    there by hand, and a file is never run."""
    try:
        raw = checkpoint.load(path)
    except (checkpoint.Unsafe, checkpoint.Unreadable) as exc:
        raise WeightsError(f"{path}: {exc}") from None
    if s.key is not None:
        key = "params_ema" if "params_ema" in raw else "params"
        if key not in raw:
            raise WeightsError(f"{path}: no 'params_ema' or 'params' in the file")
        raw = raw[key]
    # facexlib's released detector was saved from DataParallel ('module.' prefixes).
    state = {}
    for k, v in deepcopy(raw).items():
        state[k[7:] if k.startswith("module.") else k] = v
    return state


def build(
    name: str,
    weights_info: LoadedWeightsInfo,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build network ``name`` from the resolved weights; strict load, eval mode. ``dtype``
    is the face and background models'; detection and parsing stay fp32 (their outputs feed
    thresholds and argmax)."""
    s = spec(name)
    if s.kind not in ("face", "bg"):
        dtype = torch.float32
    net = construct(s, weights_info.profile)
    path = weights_info.path(name)
    try:
        net.load_state_dict(load_state(path, s), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise WeightsError(f"{path}: does not load into {s.arch}: {exc}") from exc
    net.eval().requires_grad_(False)
    device = torch.device(device)
    net = net.to(device=device, dtype=dtype)
    if s.arch == "RetinaFace":
        # RetinaFace keeps its own device and a mean tensor outside its parameters.
        net.device = device
        net.mean_tensor = net.mean_tensor.to(device)
    LOGGER.info("loaded %s (%s, %s) from %s", name, s.arch, weights_info.profile, path)
    return net
