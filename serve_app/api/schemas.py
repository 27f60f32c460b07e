"""Values the API returns: the enhanced image (HTTP and Python handles) and its headers."""

from __future__ import annotations

from dataclasses import dataclass, field

SYNTHETIC_WARNING = (
    "SYNTHETIC WEIGHTS: this server runs random-initialised weights; outputs are not real "
    "restorations. Run `photoenhance weights fetch` for the official weights."
)


@dataclass(frozen=True)
class EnhancedImage:
    """One enhanced image as returned by ``Ingress.enhance`` and ``POST /v1/enhance``.

    ``timings`` are seconds per stage: ``probe`` (the ingress's header check), then in the
    model replica ``decode``, ``queue`` (waiting for a batch), the engine's stages and
    ``encode``, and ``transfer`` (the rest of the model call: bytes both ways, routing).
    """

    data: bytes
    media_type: str
    format: str
    width: int
    height: int
    faces: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    synthetic: bool = False
    # The restored faces in the output: (x, y, width, height) in its pixels.
    face_boxes: tuple[tuple[int, int, int, int], ...] = ()

    def headers(self) -> dict[str, str]:
        """Response headers that describe this result."""
        out = {
            "Server-Timing": server_timing(self.timings),
            "X-Faces-Restored": str(self.faces),
            "X-Image-Width": str(self.width),
            "X-Image-Height": str(self.height),
        }
        if self.face_boxes:
            out["X-Face-Boxes"] = format_boxes(self.face_boxes)
        if self.synthetic:
            out["X-Weights-Synthetic"] = "true"
            out["Warning"] = f'299 photoenhance "{SYNTHETIC_WARNING}"'
        return out


MAX_HEADER_BOXES = 100  # keeps the header a few KB; X-Faces-Restored is the count


def format_boxes(boxes: tuple[tuple[int, int, int, int], ...]) -> str:
    """``X-Face-Boxes`` value: ``x,y,w,h`` per face, space-separated, the first 100."""
    return " ".join(",".join(str(int(v)) for v in b) for b in boxes[:MAX_HEADER_BOXES])


def server_timing(timings: dict[str, float]) -> str:
    """``Server-Timing`` value: each stage in milliseconds, names made token-safe."""
    parts = []
    for name, seconds in timings.items():
        token = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "stage"
        parts.append(f"{token};dur={seconds * 1000.0:.1f}")
    return ", ".join(parts)
