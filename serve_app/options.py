"""Enhancement options: one immutable value, validated once at the edge, passed down whole.

The same names are used in query strings, form fields, JSON bodies, the CLI and Python
handles. ``resolve_options`` merges a preset (built-in or saved) under explicit values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from serve_app.errors import InvalidOption

FaceModel = Literal["GFPGANv1.3", "GFPGANv1.4"]
BgModel = Literal["auto", "none", "RealESRGAN_x2plus", "RealESRGAN_x4plus", "realesr-general-x4v3"]
OutputFormat = Literal["png", "jpeg", "webp", "avif"]
MetadataMode = Literal["keep", "strip", "keep-no-gps"]
ColorMode = Literal["keep", "srgb"]
ChromaMode = Literal["auto", "444", "420"]

FACE_MODELS: tuple[str, ...] = FaceModel.__args__  # type: ignore[attr-defined]
BG_MODELS: tuple[str, ...] = BgModel.__args__  # type: ignore[attr-defined]
OUTPUT_FORMATS: tuple[str, ...] = OutputFormat.__args__  # type: ignore[attr-defined]
# A model added with `photoenhance models add`: its name is checked here, its existence and
# kind by the model replica (the one that reads the weights folder's registry).
ADDED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
AddedModel = Annotated[str, StringConstraints(pattern=ADDED_NAME_PATTERN)]
# The model whose denoise strength blends it with its `wdn` twin, as upstream's CLI does.
DENOISE_MODEL = "realesr-general-x4v3"
DENOISE_STEP = 0.05  # blended weights are cached per step, so batches still form


class EnhanceOptions(BaseModel):
    """What to do to one image. Frozen: safe to share between requests and threads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    upscale: Literal[1, 2, 4] = Field(2, description="Output scale factor.")
    face: bool = Field(True, description="Detect and restore faces with GFPGAN.")
    face_model: FaceModel | AddedModel = Field(
        "GFPGANv1.4", description="Face restorer: a built-in one or an added face model."
    )
    bg_model: BgModel | AddedModel = Field(
        "auto",
        description="Background upsampler; 'auto' picks x2plus for upscale<=2, x4plus for 4; "
        "'none' resizes the background with Lanczos; or an added upscaler, run at its own "
        "scale and then resized (Lanczos) to `upscale`.",
    )
    denoise: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Denoise strength of realesr-general-x4v3 (0: keep noise, 1: strong "
        "denoise, the plain model; unset: the plain model), rounded to 0.05.",
    )
    weight: float = Field(0.5, ge=0.0, le=1.0, description="GFPGAN fidelity weight.")
    only_center_face: bool = False
    aligned: bool = Field(False, description="Input is an aligned 512x512 face crop.")
    format: OutputFormat | None = Field(
        None, description="Default: the input's (JPEG for HEIC), PNG with alpha or 16 bits."
    )
    metadata: MetadataMode | None = Field(
        None,
        description="EXIF, XMP and IPTC of the input in the output: keep, strip, or keep-no-gps "
        "(drops location). Default: the server's (configs: encoding.metadata).",
    )
    color: ColorMode = Field(
        "keep",
        description="keep: the input's pixel values and ICC profile, unconverted; srgb: "
        "converted to sRGB, with an sRGB profile attached.",
    )
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality.")
    chroma: ChromaMode = Field(
        "auto",
        description="JPEG chroma subsampling: 444 (full colour resolution), 420 (half), or "
        "auto: 444 from quality 90 up, else 420.",
    )
    tile: int = Field(0, ge=0, le=4096, description="Tile size for the upsampler; 0: engine default.")
    preset: str | None = None

    @field_validator("tile")
    @classmethod
    def _tile_not_tiny(cls, v: int) -> int:
        if 0 < v < 32:
            raise ValueError("tile must be 0 (default) or at least 32")
        return v

    @field_validator("denoise")
    @classmethod
    def _denoise(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None:
            return None
        if info.data.get("bg_model") != DENOISE_MODEL:
            raise ValueError(f"denoise applies to bg_model={DENOISE_MODEL!r} only")
        return round(round(v / DENOISE_STEP) * DENOISE_STEP, 2)

    def resolved_bg_model(self) -> str:
        if self.bg_model != "auto":
            return self.bg_model
        return "RealESRGAN_x4plus" if self.upscale == 4 else "RealESRGAN_x2plus"


# Built-in presets: named sets of options. Saved custom presets join these at run time.
BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "portrait": {"upscale": 2, "face": True, "face_model": "GFPGANv1.4", "weight": 0.5},
    "photo-x4": {"upscale": 4, "face": True, "bg_model": "RealESRGAN_x4plus"},
    "fast": {"upscale": 4, "face": False, "bg_model": "realesr-general-x4v3"},
    "faces-only": {"upscale": 1, "face": True, "bg_model": "none"},
}

_TRUE = {"1", "true", "yes", "on"}
_INT_RE = re.compile(r"[+-]?[0-9]{1,9}\Z")
_FALSE = {"0", "false", "no", "off"}


def _coerce(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Form and query values arrive as strings; booleans need an explicit vocabulary."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and key in {"face", "only_center_face", "aligned"}:
            low = value.strip().lower()
            if low in _TRUE:
                value = True
            elif low in _FALSE:
                value = False
        elif isinstance(value, str) and key in {"upscale", "tile", "quality"}:
            # Literal[1, 2, 4] does not coerce "4"; anything but a short ASCII integer
            # ("--2", "²", 5000 digits) stays a string and fails validation as a 422.
            value = int(value) if _INT_RE.match(value.strip()) else value
        if value == "" or value is None:
            continue
        out[key] = value
    return out


def resolve_options(
    raw: Mapping[str, Any] | None = None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> EnhanceOptions:
    """Validate ``raw`` (strings or typed values) into options, applying its preset first.

    Raises ``InvalidOption`` (422) naming the first bad field.
    """
    values = _coerce(raw or {})
    table = {**BUILTIN_PRESETS, **(presets or {})}
    preset = values.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or preset not in table:
            raise InvalidOption(f"unknown preset {preset!r}; known: {sorted(table)}", field="preset")
        values = {**table[preset], **values}
    try:
        return EnhanceOptions.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "options"
        if err["loc"] and err["loc"][0] in _MODEL_FIELDS:  # the Literal | added-name union
            field = str(err["loc"][0])
            known = FACE_MODELS if field == "face_model" else BG_MODELS
            raise InvalidOption(
                f"{field}: neither a built-in model ({', '.join(known)}) nor an added model's "
                "name (letters, digits, '.', '_', '-'; at most 64)",
                field=field,
            ) from None
        raise InvalidOption(f"{field}: {err['msg']}", field=field) from None


_MODEL_FIELDS = ("face_model", "bg_model")
