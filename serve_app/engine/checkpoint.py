"""Reading a weights file: tensors only, never code.

A ``.pth``/``.pt``/``.ckpt`` file is a pickle (alone, or inside torch's zip layout), and a
pickle can name any Python callable; a TorchScript archive carries compiled code that
``torch.jit.load`` runs (a scripted ``__setstate__`` runs while the file loads). So:

- TorchScript archives are recognised by their members and refused before torch sees them
  (torch's own test, ``torch.serialization._is_torchscript_zip``, is ``constants.pkl`` among
  the records; ``torch.jit.save`` also writes ``code/``). ``torch.load`` would hand such a
  zip to ``torch.jit.load`` whenever it is not told ``weights_only=True``, as spandrel's
  ``ModelLoader`` does (with its own unpickler), and spandrel loads ``.pt`` with
  ``torch.jit.load`` directly: neither is used on a user's file here.
- Every other checkpoint goes through ``torch.load(weights_only=True)``: torch's restricted
  unpickler, which builds tensors, containers and numbers and refuses any other global.
- ``.safetensors`` holds no code at all.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

PICKLED = (".pth", ".pt", ".ckpt")
SAFETENSORS = ".safetensors"
_ZIP_MAGIC = b"PK\x03\x04"  # what torch.serialization._is_zipfile reads


class Unsafe(ValueError):
    """The file is not read: it carries code, or Python objects other than tensors."""


class Unreadable(ValueError):
    """The file is not a weights file this reader understands."""


def torchscript_members(names: list[str]) -> list[str]:
    """The members of a torch zip that make it a TorchScript archive. torch's reader strips
    the one top folder (``<archive>/``) off every name before it looks."""
    found = []
    for name in names:
        record = name.split("/", 1)[-1]
        if record == "constants.pkl" or record.startswith("code/"):
            found.append(name)
    return found


def check_not_torchscript(path: Path) -> None:
    """Refuse a TorchScript archive (``Unsafe``) or a zip that Python cannot list
    (``Unreadable``: torch's reader might see members this check did not)."""
    with open(path, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return  # a legacy (pre-1.6) torch file: one pickle stream, no archive
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise Unreadable("a damaged zip archive") from None
    if torchscript_members(names):
        raise Unsafe(
            "a TorchScript archive (it carries code, which would run while it loads); "
            "refused without loading it. Save the network's weights instead: "
            "torch.save(model.state_dict(), 'model.pth'), or a .safetensors file"
        )


def load(path: str | Path) -> dict[str, Any]:
    """The object stored in a weights file, read without running anything from it.

    Raises ``Unsafe`` (code, or objects other than tensors) or ``Unreadable``.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext == SAFETENSORS:
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception:
            raise Unreadable("not a readable .safetensors file") from None
    if ext not in PICKLED:
        raise Unreadable(
            f"unsupported file type {ext or '(none)'!r}: give a .pth, .pt, .ckpt or "
            ".safetensors file, or an ncnn .param and .bin pair"
        )
    check_not_torchscript(path)
    try:
        # Explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD in the environment cannot turn it off.
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError:
        raise Unsafe(
            "it holds Python objects other than tensors, and only tensors are read from a "
            "file (nothing in it is ever run). Save the network's weights alone: "
            "torch.save(model.state_dict(), 'model.pth'), or a .safetensors file"
        ) from None
    except Exception:
        raise Unreadable(f"not a readable {ext} weights file") from None
    if not isinstance(raw, dict):
        raise Unreadable(f"not a state dict (the file holds a {type(raw).__name__})")
    return raw
