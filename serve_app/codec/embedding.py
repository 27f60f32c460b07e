"""Metadata written into encoded JPEG or PNG bytes, segment by segment, without touching the
encoded image (``attach``); WebP and AVIF take theirs through Pillow's encoder
(``pillow_args``)."""

from __future__ import annotations

import logging
import struct
import zlib
from typing import Any

from serve_app.codec.metadata import EXIF_PREFIX, ImageMetadata

LOGGER = logging.getLogger(__name__)


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
