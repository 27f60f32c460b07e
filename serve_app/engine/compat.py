"""Compatibility shims for upstream packages; import before basicsr, gfpgan or realesrgan.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, a module torchvision
removed in 0.17. Its only use there is ``rgb_to_grayscale``, which now lives in
``torchvision.transforms.functional``; we register an alias module so the import succeeds.
"""

from __future__ import annotations

import sys
import types

_LEGACY = "torchvision.transforms.functional_tensor"


def install() -> None:
    """Register the legacy module name once; a no-op when it exists already."""
    if _LEGACY in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401
        return
    except ImportError:
        pass
    from torchvision.transforms import functional

    shim = types.ModuleType(_LEGACY)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale  # type: ignore[attr-defined]
    sys.modules[_LEGACY] = shim


install()
