"""The engine layer: PyTorch and OpenCV only, no Ray, no HTTP."""

from serve_app.engine.pipeline import Engine
from serve_app.engine.types import EnhanceResult

__all__ = ["Engine", "EnhanceResult"]
