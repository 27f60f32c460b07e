"""Colour management: the photo's own values for the models, converted only when asked.

An RGB input keeps its pixel values in its own space from decoding to encoding: the models
see them as they are (as Lightroom's and Upscayl's AI upscaling do; the models were trained
on sRGB, and Display P3 and Adobe RGB values are close enough in tone for them, while a
round trip through sRGB clips every colour outside it). ``color=keep`` writes those values
with the input's profile; ``color=srgb`` converts them to sRGB after the models and attaches
an sRGB profile. Only CMYK inputs are converted when decoded (the models take three
channels). Rendering intent: relative colorimetric, as LittleCMS applies it by default to
display profiles. A camera JPEG in Adobe RGB without a profile (DCF: EXIF ``InteropIndex``
``R03``) is given ``profiles.adobe_rgb_profile``, built from Adobe's published numbers.

Pillow's ImageCms (LittleCMS) does 8-bit images. It has no 16-bit RGB mode, so 16-bit images
take a float path written here for matrix-shaper profiles (the ``rXYZ``/``gXYZ``/``bXYZ``
colorants and ``rTRC``/``gTRC``/``bTRC`` curves that sRGB, Display P3, Adobe RGB, ProPhoto
and Rec. 2020 profiles are made of): the same maths LittleCMS does for them, in float32, so
16 bits stay 16 bits. A 16-bit image with a LUT-based profile is left as it is, profile
included (docs: README "Formats").

Parsed profiles and transforms are cached by the profile's SHA-256 in ``BoundedCache``s, which
hold neither the profile's bytes nor more than ``CACHE_BYTES`` worth of profiles: before,
``lru_cache`` kept each profile's bytes as part of its key, so 16 distinct 20 MiB profiles
grew a model replica by about 1 GB for good. A profile over ``metadata.MAX_ICC_BYTES`` is
refused before it gets here (``metadata.check_blocks``) and never parsed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np
from PIL import Image, ImageCms

from serve_app.codec.metadata import MAX_ICC_BYTES

LOGGER = logging.getLogger(__name__)
V = TypeVar("V")

ColorMode = str  # "keep" | "srgb"
COLOR_MODES: tuple[str, ...] = ("keep", "srgb")


@functools.cache
def srgb_profile() -> bytes:
    """The sRGB profile LittleCMS builds (attached to ``color=srgb`` outputs)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def space(icc: bytes | None) -> str:
    """The colour space LittleCMS reads in a profile ("RGB", "GRAY", "CMYK", ...); "" when
    there is none or it cannot be read (a broken profile is ignored, as browsers do)."""
    if not icc:
        return ""
    try:
        return str(_profile(_key(icc), icc).profile.xcolor_space).strip()
    except Exception:
        return ""


def is_srgb(icc: bytes) -> bool:
    desc = _description(icc).lower()
    return icc == srgb_profile() or desc.startswith(("srgb", "s rgb")) or "iec61966-2" in desc


def _description(icc: bytes) -> str:
    try:
        return ImageCms.getProfileDescription(_profile(_key(icc), icc)).strip()
    except Exception:
        return ""


def _key(icc: bytes) -> str:
    return hashlib.sha256(icc).hexdigest()  # not SHA-1: a collision would swap two profiles


class BoundedCache(Generic[V]):
    """A least-recently-used cache bounded in entries and in total weight (here: the bytes of
    the profiles its values were made from). Thread-safe; a value is made outside the lock,
    so two threads may make the same one, and the second is kept."""

    def __init__(self, max_entries: int, max_weight: int) -> None:
        self.max_entries, self.max_weight = max_entries, max_weight
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, weight: int, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = make()
        if weight > self.max_weight:
            return value  # never kept
        with self._lock:
            old = self._items.pop(key, None)
            self._weight += weight - (old[1] if old else 0)
            self._items[key] = (value, weight)
            while len(self._items) > self.max_entries or self._weight > self.max_weight:
                _, (_, dropped) = self._items.popitem(last=False)
                self._weight -= dropped
        return value

    @property
    def weight(self) -> int:
        return self._weight

    def __len__(self) -> int:
        return len(self._items)


CACHE_ENTRIES = 32
CACHE_BYTES = 4 * MAX_ICC_BYTES  # of profile bytes per cache (a transform holds its profile)
_PROFILES: BoundedCache[ImageCms.ImageCmsProfile] = BoundedCache(CACHE_ENTRIES, CACHE_BYTES)
_TRANSFORMS: BoundedCache[ImageCms.ImageCmsTransform] = BoundedCache(CACHE_ENTRIES, CACHE_BYTES)
_SHAPERS: BoundedCache[MatrixShaper | None] = BoundedCache(CACHE_ENTRIES // 2, CACHE_BYTES)


def _profile(key: str, icc: bytes) -> ImageCms.ImageCmsProfile:
    if len(icc) > MAX_ICC_BYTES:  # refused upstream; never parsed, whoever calls
        raise ValueError("ICC profile over its cap")
    return _PROFILES.get(
        key, len(icc), lambda: ImageCms.ImageCmsProfile(ImageCms.core.profile_frombytes(icc))
    )


def _transform(key: str, icc: bytes, mode: str, to_srgb: bool) -> ImageCms.ImageCmsTransform:
    def make() -> ImageCms.ImageCmsTransform:
        src = _profile(key, icc)
        srgb = _profile(_key(srgb_profile()), srgb_profile())
        a, b = (src, srgb) if to_srgb else (srgb, src)
        return ImageCms.buildTransform(
            a, b, mode, mode, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC
        )

    return _TRANSFORMS.get((key, mode, to_srgb), len(icc), make)


def usable(icc: bytes | None, mode: str) -> bool:
    """Whether a profile can (and needs to) be converted to sRGB for a Pillow ``mode``."""
    if not icc or mode not in ("RGB", "RGBA", "CMYK", "I;16", "I;16B", "RGB;16"):
        return False
    found = space(icc)
    if not found:
        LOGGER.info("ignoring an unreadable ICC profile")
    return found == ("CMYK" if mode == "CMYK" else "RGB") and not (mode != "CMYK" and is_srgb(icc))


def gray_to_srgb(image: np.ndarray, icc: bytes) -> np.ndarray | None:
    """An 8-bit gray array in a GRAY profile as 8-bit BGR in sRGB (for formats that hold no
    gray: WebP); None when the profile cannot do it."""
    try:
        transform = ImageCms.buildTransform(
            _profile(_key(icc), icc), _profile(_key(srgb_profile()), srgb_profile()), "L", "RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        )
        rgb = np.asarray(ImageCms.applyTransform(Image.fromarray(image, "L"), transform))
    except Exception:
        return None
    return np.ascontiguousarray(rgb[..., ::-1])


def pil_to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """An 8-bit RGB, RGBA or CMYK Pillow image converted from ``icc`` to sRGB."""
    out_mode = "RGB" if im.mode == "CMYK" else im.mode
    if im.mode == "CMYK":
        transform = ImageCms.buildTransform(
            _profile(_key(icc), icc), _profile(_key(srgb_profile()), srgb_profile()),
            "CMYK", "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL,
        )
        return ImageCms.applyTransform(im, transform)
    return ImageCms.applyTransform(im, _transform(_key(icc), icc, out_mode, True))


def array_convert(image: np.ndarray, icc: bytes, to_srgb: bool) -> np.ndarray | None:
    """An OpenCV-layout BGR(A) array (8 or 16 bits) between ``icc`` and sRGB; None if the
    profile cannot do it at this depth (then nothing is converted)."""
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        return None
    if image.dtype == np.uint8:
        mode = "RGBA" if image.shape[2] == 4 else "RGB"
        rgb = image[..., [2, 1, 0, 3]] if mode == "RGBA" else image[..., ::-1]
        im = Image.fromarray(np.ascontiguousarray(rgb), mode)
        out = np.asarray(ImageCms.applyTransform(im, _transform(_key(icc), icc, mode, to_srgb)))
        return out[..., [2, 1, 0, 3]] if mode == "RGBA" else out[..., ::-1]
    shaper = matrix_shaper(icc)
    if shaper is None:
        return None
    return shaper.convert(image, to_srgb)


# --------------------------------------------------------------------------- 16 bits


class MatrixShaper:
    """A matrix-shaper profile: curves to linear light, then a 3x3 matrix to PCS XYZ (D50)."""

    def __init__(self, matrix: np.ndarray, curves: list[np.ndarray]) -> None:
        self.matrix = matrix  # linear RGB -> XYZ
        self.curves = curves  # each: 4096-entry table, encoded [0,1] -> linear
        self._levels: np.ndarray | None = None

    def to_linear(self, rgb: np.ndarray) -> np.ndarray:
        return np.stack([_lookup(c, rgb[..., i]) for i, c in enumerate(self.curves)], axis=-1)

    def from_linear(self, lin: np.ndarray) -> np.ndarray:
        return np.stack([_inverse_lookup(c, lin[..., i]) for i, c in enumerate(self.curves)], axis=-1)

    def levels_to_linear(self, image: np.ndarray) -> np.ndarray:
        """``to_linear`` of a 16-bit image (RGB order) by table: the curves at every one of the
        65536 levels, computed once. ``np.interp`` per pixel took seconds for 12 MP."""
        if self._levels is None:
            x = np.arange(65536, dtype=np.float32) / 65535.0
            self._levels = np.stack([_lookup(c, x) for c in self.curves])
        return np.stack([self._levels[i][image[..., i]] for i in range(3)], axis=-1)

    def convert(self, image: np.ndarray, to_srgb: bool) -> np.ndarray:
        srgb = matrix_shaper(srgb_profile())
        assert srgb is not None
        src, dst = (self, srgb) if to_srgb else (srgb, self)
        top = float(np.iinfo(image.dtype).max)
        m = (np.linalg.inv(dst.matrix) @ src.matrix).astype(np.float32)
        if image.dtype == np.uint16 and to_srgb:
            lin = np.clip(src.levels_to_linear(image[..., 2::-1]) @ m.T, 0.0, 1.0)
            out = _linear_to_srgb(lin)
        else:
            rgb = image[..., 2::-1].astype(np.float32) / top
            lin = np.clip(src.to_linear(rgb) @ m.T, 0.0, 1.0)
            out = dst.from_linear(lin)
        result = (out[..., ::-1] * top + 0.5).astype(image.dtype)
        if image.shape[2] == 4:
            result = np.dstack([result, image[..., 3]])
        return result


_TABLE = 4096
# Linear light is quantised to this many steps before the inverse sRGB curve is read from a
# table: an output moves by at most 2 of 65535 levels against the exact per-pixel
# interpolation (where the curve is steepest, slope 12.92), for 8-13x less CPU
# (loadtests/codec_bench.py --only sixteen: 12 MP from P3 0.77 s against 6.0 s).
_LINEAR_STEPS = 1 << 18


@functools.lru_cache(maxsize=1)
def _srgb_inverse_table() -> np.ndarray:
    srgb = matrix_shaper(srgb_profile())
    assert srgb is not None
    grid = np.linspace(0.0, 1.0, _LINEAR_STEPS + 1, dtype=np.float32)
    return np.stack([_inverse_lookup(c, grid) for c in srgb.curves])  # 3 MB, once


def _linear_to_srgb(lin: np.ndarray) -> np.ndarray:
    table = _srgb_inverse_table()
    index = (lin * _LINEAR_STEPS + 0.5).astype(np.int32)
    return np.stack([table[i][index[..., i]] for i in range(3)], axis=-1)


def _lookup(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.interp(x, np.linspace(0.0, 1.0, len(table), dtype=np.float32), table).astype(np.float32)


def _inverse_lookup(table: np.ndarray, y: np.ndarray) -> np.ndarray:
    grid = np.linspace(0.0, 1.0, len(table), dtype=np.float32)
    return np.interp(y, np.maximum.accumulate(table), grid).astype(np.float32)


def _matrix_shaper(icc: bytes) -> MatrixShaper | None:
    tags = _tags(icc)
    try:
        cols = [_xyz(icc, tags[name]) for name in (b"rXYZ", b"gXYZ", b"bXYZ")]
        curves = [_curve(icc, tags[name]) for name in (b"rTRC", b"gTRC", b"bTRC")]
    except (KeyError, ValueError, struct.error):
        return None
    if any(c is None for c in curves):
        return None
    return MatrixShaper(np.array(cols, dtype=np.float64).T, curves)  # type: ignore[arg-type]


def matrix_shaper(icc: bytes) -> MatrixShaper | None:
    if len(icc) > MAX_ICC_BYTES:
        return None
    # Weighed as its three tables and its 16-bit levels, not the profile: the bytes are not kept.
    return _SHAPERS.get(_key(icc), 3 * (_TABLE + 65536) * 4, lambda: _matrix_shaper(icc))


def _tags(icc: bytes) -> dict[bytes, tuple[int, int]]:
    if len(icc) < 132:
        return {}
    count = struct.unpack_from(">I", icc, 128)[0]
    out = {}
    for i in range(min(count, 200)):
        sig, offset, size = struct.unpack_from(">4sII", icc, 132 + 12 * i)
        if offset + size <= len(icc):
            out[sig] = (offset, size)
    return out


def _s15(value: int) -> float:
    return value / 65536.0


def _xyz(icc: bytes, where: tuple[int, int]) -> list[float]:
    offset, _ = where
    if icc[offset:offset + 4] != b"XYZ ":
        raise ValueError("not an XYZ tag")
    return [_s15(v) for v in struct.unpack_from(">iii", icc, offset + 8)]


def _curve(icc: bytes, where: tuple[int, int]) -> np.ndarray | None:
    offset, _ = where
    kind = icc[offset:offset + 4]
    x = np.linspace(0.0, 1.0, _TABLE)
    if kind == b"curv":
        n = struct.unpack_from(">I", icc, offset + 8)[0]
        if n == 0:
            return x.astype(np.float32)
        if n == 1:
            gamma = struct.unpack_from(">H", icc, offset + 12)[0] / 256.0
            return (x**gamma).astype(np.float32)
        table = np.frombuffer(icc, ">u2", n, offset + 12).astype(np.float64) / 65535.0
        return np.interp(x, np.linspace(0.0, 1.0, n), table).astype(np.float32)
    if kind == b"para":
        ftype = struct.unpack_from(">H", icc, offset + 8)[0]
        nparams = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}.get(ftype)
        if nparams is None:
            return None
        p = [_s15(v) for v in struct.unpack_from(f">{nparams}i", icc, offset + 12)]
        g, a, b, c, d, e, f = (p + [0.0] * 7)[:7]
        if ftype == 0:
            y = x**g
        elif ftype == 1:
            y = np.where(x >= -b / a, np.clip(a * x + b, 0, None) ** g, 0.0)
        elif ftype == 2:
            y = np.where(x >= -b / a, np.clip(a * x + b, 0, None) ** g + c, c)
        elif ftype == 3:
            y = np.where(x >= d, np.clip(a * x + b, 0, None) ** g, c * x)
        else:
            y = np.where(x >= d, np.clip(a * x + b, 0, None) ** g + e, c * x + f)
        return np.clip(y, 0.0, 1.0).astype(np.float32)
    return None
