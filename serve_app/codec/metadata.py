"""What a photo carries besides its pixels: EXIF, XMP, IPTC, the ICC profile and its DPI.

``read_metadata`` takes them from an opened Pillow image (every input format); ``prepare``
makes them true for the output (orientation 1 after it was applied to the pixels, the new
pixel size, DPI scaled with the image so the print size stays, no thumbnail, and the
``metadata`` option's choice: ``keep``, ``strip`` or ``keep-no-gps``); ``attach`` writes
them into encoded JPEG or PNG bytes, segment by segment, without touching the encoded image.
WebP and AVIF carry them through Pillow's encoder instead (``pillow_args``).

Pillow does the byte work (its ``Image.Exif`` parses and serialises EXIF, sub-IFDs included,
and drops IFD1, the thumbnail, on the way): docs/BENCHMARKS.md ("Metadata library") has the
measurement against piexif and pyvips behind that choice.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Any, Literal

from PIL import Image

LOGGER = logging.getLogger(__name__)

MetadataMode = Literal["keep", "strip", "keep-no-gps"]
METADATA_MODES: tuple[str, ...] = ("keep", "strip", "keep-no-gps")

EXIF_PREFIX = b"Exif\x00\x00"
_ORIENTATION = 0x0112
_X_RESOLUTION, _Y_RESOLUTION, _RESOLUTION_UNIT = 0x011A, 0x011B, 0x0128
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
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
# XMP properties that locate the photo or hold a thumbnail.
_XMP_DROP_NO_GPS = r"exif:GPS\w+|photoshop:(?:City|State|Country)|Iptc4xmpCore:(?:Location|CountryCode)|Iptc4xmpExt:Location\w*"
_XMP_DROP_ALWAYS = r"xmp:Thumbnails|xapGImg:\w+|xmpGImg:\w+"


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


def read_metadata(im: Image.Image, fmt: str) -> tuple[ImageMetadata, int]:
    """The image's metadata and its EXIF orientation (1 for HEIF: libheif applies it)."""
    info = im.info
    exif_raw = info.get("exif")
    if fmt == "tiff":
        # A TIFF's EXIF is its own first page directory; keep only what describes the photo.
        try:
            exif_raw = im.getexif().tobytes()
        except Exception:
            exif_raw = None
    exif = load_exif(exif_raw if isinstance(exif_raw, bytes) else None)
    orientation = 1 if fmt == "heif" else orientation_of(exif)
    xmp = info.get("xmp")
    if fmt == "tiff" and not xmp:
        xmp = _tag_bytes(getattr(im, "tag_v2", {}).get(700))
    return ImageMetadata(
        exif=exif.tobytes()[len(EXIF_PREFIX):] if exif is not None and len(exif) else None,
        xmp=bytes(xmp) if isinstance(xmp, bytes | bytearray) and xmp else None,
        iptc=_read_iptc(im, fmt),
        icc_profile=info.get("icc_profile") or None,
        dpi=_dpi(info.get("dpi"), exif),
    ), orientation


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
    try:
        if value and float(value[0]) > 0 and float(value[1]) > 0:
            return float(value[0]), float(value[1])
        if exif is not None and _X_RESOLUTION in exif and _Y_RESOLUTION in exif:
            unit = exif.get(_RESOLUTION_UNIT, 2)
            scale = 2.54 if unit == 3 else 1.0
            if unit in (2, 3):
                x, y = float(exif[_X_RESOLUTION]) * scale, float(exif[_Y_RESOLUTION]) * scale
                if x > 0 and y > 0:
                    return x, y
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- making it true


def prepare(
    meta: ImageMetadata, mode: str, width: int, height: int, icc_profile: bytes | None
) -> ImageMetadata:
    """What to write for an output of ``width`` x ``height`` with ``icc_profile`` attached."""
    dpi = None
    if meta.dpi and meta.size and meta.size[0] > 0 and meta.size[1] > 0:
        dpi = (meta.dpi[0] * width / meta.size[0], meta.dpi[1] * height / meta.size[1])
    if mode == "strip":
        return ImageMetadata(icc_profile=icc_profile, dpi=dpi, size=(width, height))
    if mode not in METADATA_MODES:
        raise ValueError(f"metadata mode {mode!r}")
    no_gps = mode == "keep-no-gps"
    return replace(
        meta,
        exif=_prepare_exif(meta.exif, no_gps, width, height, dpi),
        xmp=_prepare_xmp(meta.xmp, no_gps, width, height),
        iptc=_drop_iptc_places(meta.iptc) if no_gps and meta.iptc else meta.iptc,
        icc_profile=icc_profile,
        dpi=dpi,
        size=(width, height),
    )


def _prepare_exif(
    raw: bytes | None, no_gps: bool, width: int, height: int, dpi: tuple[float, float] | None
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
    if not len(exif):
        return None
    data = exif.tobytes()  # IFD0 and its sub-IFDs only: IFD1 (the thumbnail) is not written
    return data[len(EXIF_PREFIX):] if data.startswith(EXIF_PREFIX) else data


def _prepare_xmp(raw: bytes | None, no_gps: bool, width: int, height: int) -> bytes | None:
    if not raw:
        return None
    text = raw.decode("utf-8", "replace")
    text = _xmp_set(text, "tiff:Orientation", "1")
    text = _xmp_set(text, "exif:PixelXDimension", str(width))
    text = _xmp_set(text, "exif:PixelYDimension", str(height))
    text = _xmp_set(text, "tiff:ImageWidth", str(width))
    text = _xmp_set(text, "tiff:ImageLength", str(height))
    text = _xmp_drop(text, _XMP_DROP_ALWAYS)
    if no_gps:
        text = _xmp_drop(text, _XMP_DROP_NO_GPS)
    return text.encode("utf-8")


def _xmp_set(text: str, name: str, value: str) -> str:
    text = re.sub(rf'({re.escape(name)}\s*=\s*")[^"]*(")', rf"\g<1>{value}\g<2>", text)
    return re.sub(rf"(<{re.escape(name)}>)[^<]*(</{re.escape(name)}>)", rf"\g<1>{value}\g<2>", text)


def _xmp_drop(text: str, names: str) -> str:
    text = re.sub(rf'\s(?:{names})\s*=\s*"[^"]*"', "", text)
    return re.sub(rf"<({names})\b[^>]*?(?:/>|>.*?</\1\s*>)", "", text, flags=re.S)


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


# --------------------------------------------------------------------------- writing


def pillow_args(meta: ImageMetadata) -> dict[str, Any]:
    """Save arguments for Pillow's WebP and AVIF encoders."""
    args: dict[str, Any] = {}
    if meta.exif:
        args["exif"] = EXIF_PREFIX + meta.exif
    if meta.xmp:
        args["xmp"] = meta.xmp
    if meta.icc_profile:
        args["icc_profile"] = meta.icc_profile
    return args


def attach(data: bytes, fmt: str, meta: ImageMetadata) -> bytes:
    """Insert the metadata into encoded JPEG or PNG bytes (other formats pass unchanged)."""
    if fmt == "jpeg":
        return _attach_jpeg(data, meta)
    if fmt == "png":
        return _attach_png(data, meta)
    return data


_JPEG_SEGMENT_MAX = 65533  # payload of one marker segment, after its 2-byte length
_XMP_NS = b"http://ns.adobe.com/xap/1.0/\x00"
_ICC_NAME = b"ICC_PROFILE\x00"


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _attach_jpeg(data: bytes, meta: ImageMetadata) -> bytes:
    pos = 2
    head = bytearray(data[:2])
    if data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\x00":  # keep JFIF first, fix density
        end = 4 + int.from_bytes(data[4:6], "big")
        app0 = bytearray(data[2:end])
        if meta.dpi and len(app0) >= 16:
            app0[11] = 1  # units: dots per inch
            app0[12:16] = struct.pack(">HH", *(min(65535, max(1, round(v))) for v in meta.dpi))
        head += app0
        pos = end
    segments = []
    if meta.exif:
        if len(EXIF_PREFIX) + len(meta.exif) <= _JPEG_SEGMENT_MAX:
            segments.append(_segment(0xE1, EXIF_PREFIX + meta.exif))
        else:
            LOGGER.warning("EXIF of %d bytes does not fit a JPEG segment; dropped", len(meta.exif))
    if meta.xmp:
        if len(_XMP_NS) + len(meta.xmp) <= _JPEG_SEGMENT_MAX:
            segments.append(_segment(0xE1, _XMP_NS + meta.xmp))
        else:
            LOGGER.warning("XMP of %d bytes does not fit a JPEG segment; dropped", len(meta.xmp))
    if meta.icc_profile:
        step = _JPEG_SEGMENT_MAX - len(_ICC_NAME) - 2
        chunks = [meta.icc_profile[i:i + step] for i in range(0, len(meta.icc_profile), step)]
        if len(chunks) <= 255:
            for i, chunk in enumerate(chunks, 1):
                segments.append(_segment(0xE2, _ICC_NAME + bytes([i, len(chunks)]) + chunk))
    if meta.iptc:
        resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(meta.iptc))
        resource += meta.iptc + (b"\x00" if len(meta.iptc) % 2 else b"")
        payload = b"Photoshop 3.0\x00" + resource
        if len(payload) <= _JPEG_SEGMENT_MAX:
            segments.append(_segment(0xED, payload))
    return bytes(head) + b"".join(segments) + data[pos:]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _attach_png(data: bytes, meta: ImageMetadata) -> bytes:
    ihdr_end = 8 + 8 + int.from_bytes(data[8:12], "big") + 4
    chunks = []
    if meta.icc_profile:
        chunks.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(meta.icc_profile)))
    if meta.dpi:
        ppm = [max(1, round(v / 0.0254)) for v in meta.dpi]
        chunks.append(_png_chunk(b"pHYs", struct.pack(">IIB", ppm[0], ppm[1], 1)))
    if meta.exif:
        chunks.append(_png_chunk(b"eXIf", meta.exif))
    if meta.xmp:
        chunks.append(_png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + meta.xmp))
    return data[:ihdr_end] + b"".join(chunks) + data[ihdr_end:]
