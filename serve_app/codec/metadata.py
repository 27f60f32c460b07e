"""What a photo carries besides its pixels: EXIF, XMP, IPTC, the ICC profile and its DPI.

``read_metadata`` takes them from an opened Pillow image (every input format); ``prepare``
makes them true for the output (orientation 1 after it was applied to the pixels, the new
pixel size, DPI scaled with the image so the print size stays, in EXIF, JFIF, ``pHYs`` and
XMP alike (EXIF's DPI wins over JFIF's), EXIF ``ColorSpace`` saying what the output's profile
is, no thumbnail, the IPTC caption copied into XMP ``dc:description`` for formats that hold
no IPTC, and the ``metadata`` option's choice: ``keep``, ``strip`` or ``keep-no-gps``);
``read_metadata`` also gives a DCF camera's Adobe RGB JPEG (EXIF ``R03``, no profile) its
Adobe RGB profile. XMP is edited in ``codec/xmp.py``; ``codec/embedding.py`` writes the
blocks into encoded JPEG or PNG bytes (WebP and AVIF: through Pillow's encoder).

Pillow does the byte work (its ``Image.Exif`` parses and serialises EXIF, sub-IFDs included,
and drops IFD1, the thumbnail, on the way): docs/BENCHMARKS.md ("Metadata library") has the
measurement against piexif and pyvips behind that choice.

Every block is bounded before anything parses it (docs/SECURITY.md, "Metadata"), on the
model replica's threads and in the codec workers alike:

- ``MAX_ICC_BYTES`` (4 MiB) and ``MAX_EXIF_BYTES`` (128 KiB): over the cap the image is
  refused, ``413 metadata_too_large``, because both change how the pixels are shown (colours;
  orientation and DPI), so serving the photo without them would silently turn or recolour
  it. Display and camera profiles are a few KiB, printer profiles with large LUTs 1-3 MiB; a
  camera JPEG's EXIF cannot pass 64 KiB (one APP1 segment), and Pillow parses about 20 µs of
  CPU per EXIF entry, so the cap bounds a decode and encode's three parses to about 0.3 s.
- ``MAX_XMP_BYTES`` (1 MiB) and ``MAX_IPTC_BYTES`` (256 KiB): over the cap the block is
  dropped (the photo is served without it; ``ImageMetadata.dropped`` names it and the log
  says so), since neither changes the pixels. A camera's or an editor's XMP is tens of KiB.
- PNG text chunks (``tEXt``, ``zTXt``, ``iTXt``) other than the XMP one are never carried to
  the output, so ``png_for_pillow`` removes them before Pillow opens the file: a ``zTXt`` is
  never inflated (200 of them made Pillow inflate 64 MiB on the ingress before).

XMP is edited by ``edit_xmp``: one pass over its tags, linear in its length (the regular
expressions used before were quadratic on unclosed elements: 64 KiB took 1 s of CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from PIL import Image, PngImagePlugin

from serve_app.codec.profiles import adobe_rgb_profile
from serve_app.codec.xmp import prepare_xmp
from serve_app.errors import PayloadTooLarge

LOGGER = logging.getLogger(__name__)

MAX_XMP_BYTES = 1 << 20
MAX_ICC_BYTES = 4 << 20
MAX_EXIF_BYTES = 128 << 10
MAX_IPTC_BYTES = 256 << 10
# Pillow's own PNG bounds, as a backstop for any PNG that reaches it without
# ``png_for_pillow``: one inflated chunk may be an ICC profile we accept, and all text chunks
# together (only the XMP one is left) no more than twice the XMP cap (its default: 64 MiB).
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, MAX_ICC_BYTES + 1)
PngImagePlugin.MAX_TEXT_MEMORY = 2 * MAX_XMP_BYTES

MetadataMode = Literal["keep", "strip", "keep-no-gps"]
METADATA_MODES: tuple[str, ...] = ("keep", "strip", "keep-no-gps")

EXIF_PREFIX = b"Exif\x00\x00"
_ORIENTATION = 0x0112
_X_RESOLUTION, _Y_RESOLUTION, _RESOLUTION_UNIT = 0x011A, 0x011B, 0x0128
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
_COLOR_SPACE, _INTEROP_INDEX = 0xA001, 0x0001  # ColorSpace: 1 sRGB, 0xFFFF uncalibrated
# Formats whose output here carries no IPTC-IIM block: its caption goes into XMP instead.
_NO_IPTC_FORMATS = frozenset({"png", "webp", "avif"})
# IFD0 tags that describe a TIFF file's own layout (or its thumbnail), not the photo: a TIFF
# input's IFD0 is full of them, and none is true of the output.
_LAYOUT_TAGS = frozenset({
    0x00FE, 0x00FF, 0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0107, 0x0108, 0x0109, 0x010A,
    0x0111, 0x0115, 0x0116, 0x0117, 0x0118, 0x0119, 0x011C, 0x0122, 0x0123, 0x0124, 0x0125,
    0x013D, 0x013E, 0x013F, 0x0140, 0x0142, 0x0143, 0x0144, 0x0145, 0x014A, 0x0152, 0x0153,
    0x0154, 0x0155, 0x015B, 0x0200, 0x0201, 0x0202, 0x0211, 0x0212, 0x0213, 0x0214, 0x02BC,
    0x83BB, 0x8649, 0x8773,
})
# IPTC-IIM datasets (record 2) that name a place: dropped with the GPS tags.
_IPTC_PLACES = frozenset({26, 90, 92, 95, 100, 101})
# TIFF tags carried as blocks of their own (XMP, IPTC, ICC) or holding Photoshop's layers and
# resources (often far larger than the photo's description): not part of a TIFF's EXIF.
_TIFF_NOT_EXIF = frozenset({700, 33723, 34675, 34377, 37724})


@dataclass(frozen=True)
class ImageMetadata:
    """Side information of a decoded image; ``size`` is (width, height) after orientation."""

    exif: bytes | None = None
    xmp: bytes | None = None
    iptc: bytes | None = None
    icc_profile: bytes | None = None
    dpi: tuple[float, float] | None = None
    size: tuple[int, int] | None = None
    pixels_in_srgb: bool = False  # the pixels were converted from ``icc_profile`` to sRGB
    dropped: tuple[str, ...] = ()  # blocks over their cap, not carried ("xmp", "iptc")

    @property
    def empty(self) -> bool:
        return not (self.exif or self.xmp or self.iptc or self.icc_profile or self.dpi)


# --------------------------------------------------------------------------- reading


def load_exif(raw: bytes | None) -> Image.Exif | None:
    """Parse EXIF (with or without the ``Exif\\0\\0`` prefix); None when absent or broken."""
    if not raw:
        return None
    exif = Image.Exif()
    try:
        exif.load(raw if raw.startswith(EXIF_PREFIX) else EXIF_PREFIX + raw)
    except Exception:  # a broken EXIF block is not worth refusing the photo
        return None
    return exif


def orientation_of(exif: Image.Exif | None) -> int:
    value = exif.get(_ORIENTATION, 1) if exif is not None else 1
    return int(value) if value in range(1, 9) else 1


def read_metadata(
    im: Image.Image, fmt: str, dropped: tuple[str, ...] = ()
) -> tuple[ImageMetadata, int]:
    """The image's metadata and its EXIF orientation (1 for HEIF: libheif applies it).

    Each block is measured against its cap before it is parsed: an ICC profile or EXIF block
    over it is refused (``PayloadTooLarge``, ``metadata_too_large``), an XMP or IPTC block is
    dropped. ``dropped`` names blocks already dropped on the way (``png_for_pillow``).
    """
    info = im.info
    check_blocks(info)
    exif_raw = info.get("exif")
    if fmt == "tiff":
        exif_raw = _tiff_exif(im)
        if exif_raw is not None and len(exif_raw) > MAX_EXIF_BYTES:
            raise too_large("exif", len(exif_raw), MAX_EXIF_BYTES)
    exif = load_exif(exif_raw if isinstance(exif_raw, bytes) else None)
    orientation = 1 if fmt == "heif" else orientation_of(exif)
    xmp = info.get("xmp")
    if fmt == "tiff" and not xmp:
        xmp = _tag_bytes(getattr(im, "tag_v2", {}).get(700))
    for block in dropped:
        LOGGER.warning("%s over its cap; dropped", _BLOCKS[block])
    lost = list(dropped)
    xmp = _capped("xmp", bytes(xmp) if isinstance(xmp, bytes | bytearray) else None,
                  MAX_XMP_BYTES, lost)
    iptc = _capped("iptc", _read_iptc(im, fmt), MAX_IPTC_BYTES, lost)
    icc = info.get("icc_profile") or None
    if icc is None and _dcf_adobe_rgb(exif):
        icc = adobe_rgb_profile()
    return ImageMetadata(
        exif=exif.tobytes()[len(EXIF_PREFIX):] if exif is not None and len(exif) else None,
        xmp=xmp or None,
        iptc=iptc,
        icc_profile=icc,
        dpi=_dpi(info.get("dpi"), exif),
        dropped=tuple(sorted(set(lost))),
    ), orientation


_BLOCKS = {"icc": "ICC profile", "exif": "EXIF block", "xmp": "XMP packet", "iptc": "IPTC block"}


def too_large(block: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the image's {_BLOCKS[block]} is {size} bytes; the largest accepted is {limit}",
        code="metadata_too_large", block=block, size=size, limit=limit,
    )


def check_blocks(info: Mapping[str, Any]) -> None:
    """Refuse an image whose ICC profile or EXIF block (as a Pillow header read left them in
    ``info``) is over its cap: both change how the pixels look, so they are not dropped."""
    for block, key, limit in (("icc", "icc_profile", MAX_ICC_BYTES), ("exif", "exif", MAX_EXIF_BYTES)):
        value = info.get(key)
        if isinstance(value, bytes | bytearray) and len(value) > limit:
            raise too_large(block, len(value), limit)


def _capped(block: str, value: bytes | None, limit: int, lost: list[str]) -> bytes | None:
    if value is not None and len(value) > limit:
        LOGGER.warning("%s of %d bytes is over its cap (%d); dropped", _BLOCKS[block], len(value), limit)
        lost.append(block)
        return None
    return value


def _dcf_adobe_rgb(exif: Image.Exif | None) -> bool:
    """Whether EXIF says Adobe RGB the way cameras do without an ICC profile (DCF 2.0: the
    Interop IFD's ``InteropIndex`` "R03" with ``ColorSpace`` uncalibrated or absent; some
    cameras write ``ColorSpace`` 2 instead)."""
    if exif is None or _EXIF_IFD not in exif:
        return False
    try:
        sub = exif.get_ifd(_EXIF_IFD)
        space = sub.get(_COLOR_SPACE)
        if space == 2:
            return True
        index = exif.get_ifd(_INTEROP_IFD).get(_INTEROP_INDEX) if _INTEROP_IFD in sub else None
    except Exception:  # a broken sub-IFD says nothing
        return False
    return space in (None, 0xFFFF) and isinstance(index, str) and index.strip("\0 ") == "R03"


def _tiff_exif(im: Image.Image) -> bytes | None:
    """A TIFF's EXIF is its own first page directory: only what describes the photo is kept
    (not its layout, nor the blocks carried on their own)."""
    try:
        exif = im.getexif()
        for tag in (_LAYOUT_TAGS | _TIFF_NOT_EXIF) & set(exif):
            del exif[tag]
        return exif.tobytes()
    except Exception:
        return None


def _tag_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
        return bytes(v & 0xFF for v in value)
    if isinstance(value, str):
        return value.encode()
    return None


def _read_iptc(im: Image.Image, fmt: str) -> bytes | None:
    if fmt == "jpeg":
        resources = im.info.get("photoshop") or {}
        return resources.get(0x0404) or None
    if fmt == "tiff":
        return _tag_bytes(getattr(im, "tag_v2", {}).get(33723))
    return None


def _dpi(value: Any, exif: Image.Exif | None) -> tuple[float, float] | None:
    """Pixels per inch: EXIF's when it has them (where a JPEG's JFIF header disagrees, EXIF
    wins, as in Lightroom and exiftool's composite tags), else the container's own field."""
    try:
        if exif is not None and _X_RESOLUTION in exif and _Y_RESOLUTION in exif:
            unit = exif.get(_RESOLUTION_UNIT, 2)
            scale = 2.54 if unit == 3 else 1.0
            if unit in (2, 3):
                x, y = float(exif[_X_RESOLUTION]) * scale, float(exif[_Y_RESOLUTION]) * scale
                if x > 0 and y > 0:
                    return x, y
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        pass
    try:
        if value and float(value[0]) > 0 and float(value[1]) > 0:
            return float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- making it true


def prepare(
    meta: ImageMetadata, mode: str, width: int, height: int, icc_profile: bytes | None,
    *, fmt: str | None = None, srgb: bool | None = None,
) -> ImageMetadata:
    """What to write for an output of ``width`` x ``height`` with ``icc_profile`` attached
    (``srgb``: whether it is an sRGB one; None: no profile), in format ``fmt``."""
    dpi = None
    if meta.dpi and meta.size and meta.size[0] > 0 and meta.size[1] > 0:
        dpi = (meta.dpi[0] * width / meta.size[0], meta.dpi[1] * height / meta.size[1])
    if mode == "strip":
        return ImageMetadata(icc_profile=icc_profile, dpi=dpi, size=(width, height))
    if mode not in METADATA_MODES:
        raise ValueError(f"metadata mode {mode!r}")
    no_gps = mode == "keep-no-gps"
    ratio = (width / meta.size[0], height / meta.size[1]) if meta.size and all(meta.size) else None
    caption = _iptc_caption(meta.iptc) if fmt in _NO_IPTC_FORMATS and meta.iptc else None
    xmp = prepare_xmp(meta.xmp, no_gps, width, height, dpi, ratio, caption)
    return replace(
        meta,
        exif=_prepare_exif(meta.exif, no_gps, width, height, dpi, srgb),
        xmp=xmp,
        iptc=_drop_iptc_places(meta.iptc) if no_gps and meta.iptc else meta.iptc,
        icc_profile=icc_profile,
        dpi=dpi,
        size=(width, height),
        dropped=tuple(sorted({*meta.dropped, "xmp"})) if meta.xmp and not xmp else meta.dropped,
    )


def _prepare_exif(
    raw: bytes | None, no_gps: bool, width: int, height: int, dpi: tuple[float, float] | None,
    srgb: bool | None = None,
) -> bytes | None:
    exif = load_exif(raw)
    if exif is None:
        return None
    for tag in _LAYOUT_TAGS & set(exif):
        del exif[tag]
    if _ORIENTATION in exif:
        exif[_ORIENTATION] = 1
    if no_gps and _GPS_IFD in exif:
        del exif[_GPS_IFD]
    if dpi is not None:
        exif[_X_RESOLUTION], exif[_Y_RESOLUTION] = round(dpi[0], 4), round(dpi[1], 4)
        exif[_RESOLUTION_UNIT] = 2
    sub = exif.get_ifd(_EXIF_IFD)
    if sub or _EXIF_IFD in exif:
        sub[_PIXEL_X], sub[_PIXEL_Y] = width, height
        _say_color_space(exif, sub, srgb)
    if not len(exif):
        return None
    data = exif.tobytes()  # IFD0 and its sub-IFDs only: IFD1 (the thumbnail) is not written
    return data[len(EXIF_PREFIX):] if data.startswith(EXIF_PREFIX) else data


def _say_color_space(exif: Image.Exif, sub: dict[int, Any], srgb: bool | None) -> None:
    """EXIF ``ColorSpace`` (and DCF's ``InteropIndex``) made true of the output's profile:
    sRGB (1, "R98") when it is sRGB; uncalibrated (0xFFFF) where it said sRGB of another."""
    if srgb is None:
        return  # no profile: the pixels are sRGB by convention, as the EXIF says
    if srgb:
        sub[_COLOR_SPACE] = 1
        try:
            interop = exif.get_ifd(_INTEROP_IFD) if _INTEROP_IFD in sub else None
        except Exception:
            interop = None
        if interop and _INTEROP_INDEX in interop:
            interop[_INTEROP_INDEX] = "R98"
    elif sub.get(_COLOR_SPACE) == 1:
        sub[_COLOR_SPACE] = 0xFFFF


def _iptc_caption(iim: bytes) -> str | None:
    """The IPTC-IIM caption (2:120), as text: UTF-8 where the block says so (1:90) or where
    it decodes as such, else Latin-1, as exiftool reads it."""
    caption, utf8 = None, False
    pos = 0
    while pos + 5 <= len(iim) and iim[pos] == 0x1C:
        record, dataset = iim[pos + 1], iim[pos + 2]
        size = int.from_bytes(iim[pos + 3:pos + 5], "big")
        start = pos + 5
        if size & 0x8000:
            n = size & 0x7FFF
            size, start = int.from_bytes(iim[start:start + n], "big"), start + n
        value = iim[start:start + size]
        if record == 1 and dataset == 90:
            utf8 = value == b"\x1b%G"
        elif record == 2 and dataset == 120 and caption is None:
            caption = value
        pos = start + size
    if not caption:
        return None
    try:
        return caption.decode("utf-8")
    except UnicodeDecodeError:
        return None if utf8 else caption.decode("latin-1")


# A tag: ``<`` to ``>``, where a quoted value may hold ``>`` but nothing holds ``<`` (XML
# forbids it in attribute values). A match never crosses a ``<``, so trying one at every
# ``<`` costs, all together, one pass over the text.
def _drop_iptc_places(iim: bytes) -> bytes | None:
    """IPTC-IIM datasets without those of record 2 that name a place."""
    out, pos = bytearray(), 0
    while pos + 5 <= len(iim) and iim[pos] == 0x1C:
        record, dataset = iim[pos + 1], iim[pos + 2]
        size = int.from_bytes(iim[pos + 3:pos + 5], "big")
        start = pos + 5
        if size & 0x8000:  # extended length: the next (size & 0x7FFF) bytes hold it
            n = size & 0x7FFF
            size, start = int.from_bytes(iim[start:start + n], "big"), start + n
        end = start + size
        if not (record == 2 and dataset in _IPTC_PLACES):
            out += iim[pos:end]
        pos = end
    return bytes(out) or None
