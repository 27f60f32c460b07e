"""Values the engine takes and returns. No Ray, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# An image as OpenCV decodes it with IMREAD_UNCHANGED (after EXIF orientation):
# HxW gray, HxWx3 BGR or HxWx4 BGRA; uint8 or uint16.
Image = np.ndarray


@dataclass
class EnhanceResult:
    """One enhanced image: same channel layout and dtype as its input."""

    image: Image
    faces: int = 0
    # Seconds per stage (detect, align, restore, upsample, paste, ...), for Server-Timing.
    timings: dict[str, float] = field(default_factory=dict)
    # The restored faces in the output: (x, y, width, height) in its pixels.
    face_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
