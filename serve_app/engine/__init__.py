"""The engine layer: PyTorch and OpenCV only, no Ray, no HTTP. Its front door: the deployments
import the engine from here (``from serve_app.engine import Engine``), never its modules.

Every import of an engine module runs this file first, the light ones (``types``,
``catalog``, ``weights``) included, so it must not load torch: ``EnhanceResult`` (no torch)
is imported with the package; the names that load torch are imported on first use (PEP 562
``__getattr__``), i.e. only where a model replica uses them:

- ``Engine``: the loaded networks (``engine.py``), built in ``Enhancer.__init__``;
- ``Staged``: a batch between its device stages and its paste (``stages.py``);
- ``GpuJpeg``: nvJPEG on a CUDA replica (``nvjpeg.py``).

The api reaches ``catalog`` directly (no torch; see docs/ARCHITECTURE.md), and the commands
that run engine code in their own process (bench, weights, models) its modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve_app.engine.types import EnhanceResult

if TYPE_CHECKING:  # for type checkers; at run time ``__getattr__`` imports them
    from serve_app.engine.engine import Engine
    from serve_app.engine.nvjpeg import GpuJpeg
    from serve_app.engine.stages import Staged

__all__ = ["Engine", "EnhanceResult", "GpuJpeg", "Staged"]


def __getattr__(name: str) -> Any:
    # Plain imports, not importlib by name: import-linter sees where each one leads.
    if name == "Engine":
        from serve_app.engine import engine as home
    elif name == "Staged":
        from serve_app.engine import stages as home
    elif name == "GpuJpeg":
        from serve_app.engine import nvjpeg as home
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(home, name)
    globals()[name] = value  # resolved once
    return value
