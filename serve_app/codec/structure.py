"""Structural pre-checks: count what makes a decoder work, before any decoder runs.

The pixel count in a header bounds memory, not work. A progressive JPEG may repeat scans
(each one a full pass over every coefficient, a few bytes each), a TIFF may cut a small image
into millions of strips, a PNG or WebP may carry thousands of chunks or frames. Each check
here walks the container's structure in bounded steps (it stops as soon as a limit is passed,
so its own cost is bounded too) and refuses the file with a named ``ImageTooComplex`` (413).
What is malformed beyond walking is left to the decoder, which answers 422.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from serve_app.config import LimitsConfig
from serve_app.errors import ImageTooComplex

# A marker inside entropy-coded data: 0xFF followed by anything but a stuffed zero, a restart
# marker or another fill byte. Found by the regex engine in C, whatever the scan holds.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9


def check_structure(data: bytes, fmt: str, limits: LimitsConfig) -> None:
    """Refuse ``data`` (already sniffed as ``fmt``) when its structure passes ``limits``."""
    walker = _WALKERS.get(fmt)
    if walker is not None:
        walker(data, limits)


def _too_complex(what: str, count: int, limit: int, code: str) -> ImageTooComplex:
    return ImageTooComplex(
        f"image has more than {limit} {what}; refused before decoding",
        code=code, limit=limit, counted=count,
    )


def jpeg_counts(data: bytes, limits: LimitsConfig) -> tuple[int, int]:
    """(markers, scans) up to the first EOI, stopping with an error past either limit."""
    markers = scans = 0
    pos, end = 2, len(data)
    while pos < end - 1:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
        marker = data[pos + 1]
        markers += 1
        if markers > limits.max_jpeg_markers:
            raise _too_complex("JPEG markers", markers, limits.max_jpeg_markers, "too_many_markers")
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > end:
            break
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _JPEG_SOS:
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise _too_complex("JPEG scans", scans, limits.max_jpeg_scans, "too_many_scans")
    return markers, scans


def _check_jpeg(data: bytes, limits: LimitsConfig) -> None:
    jpeg_counts(data, limits)


def _check_chunks(
    data: bytes, pos: int, limits: LimitsConfig, chunk: Callable[[bytes, int], tuple[bytes, int]],
    frame: bytes, what: str,
) -> None:
    """Walk chunks from ``pos``; ``chunk`` gives a chunk's kind and its whole size."""
    chunks = frames = 0
    while pos + 8 <= len(data):
        kind, size = chunk(data, pos)
        chunks += 1
        if chunks > limits.max_chunks:
            raise _too_complex(f"{what} chunks", chunks, limits.max_chunks, "too_many_chunks")
        if kind == frame:
            frames += 1
            if frames > limits.max_frames:
                raise _too_complex("frames", frames, limits.max_frames, "too_many_frames")
        if kind == b"IEND":
            break
        pos += size


def _png_chunk(data: bytes, pos: int) -> tuple[bytes, int]:
    return data[pos + 4:pos + 8], 12 + int.from_bytes(data[pos:pos + 4], "big")


def _riff_chunk(data: bytes, pos: int) -> tuple[bytes, int]:
    length = int.from_bytes(data[pos + 4:pos + 8], "little")
    return data[pos:pos + 4], 8 + length + (length & 1)


def _check_png(data: bytes, limits: LimitsConfig) -> None:
    _check_chunks(data, 8, limits, _png_chunk, b"fcTL", "PNG")


def _check_webp(data: bytes, limits: LimitsConfig) -> None:
    _check_chunks(data, 12, limits, _riff_chunk, b"ANMF", "WebP")


_TIFF_STRIP_TAGS = (273, 324)  # StripOffsets, TileOffsets
_TIFF_SUBIFDS = 330


def tiff_counts(data: bytes, limits: LimitsConfig) -> tuple[int, int]:
    """(pages, largest strip or tile count of a page), stopping with an error past a limit."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return 0, 0
    big = struct.unpack_from(order + "H", data, 2)[0] == 43
    if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        if len(data) < 16:
            return 0, 0
        offset = struct.unpack_from(order + "Q", data, 8)[0]
        count_fmt, entry_fmt, entry_size, next_fmt = "Q", "HHQQ", 20, "Q"
    else:
        offset = struct.unpack_from(order + "I", data, 4)[0]
        count_fmt, entry_fmt, entry_size, next_fmt = "H", "HHII", 12, "I"
    count_size = struct.calcsize(count_fmt)
    pages = most = 0
    seen: set[int] = set()
    while offset and offset not in seen and offset + count_size <= len(data):
        seen.add(offset)
        pages += 1
        if pages > limits.max_frames:
            raise _too_complex("pages", pages, limits.max_frames, "too_many_frames")
        entries = struct.unpack_from(order + count_fmt, data, offset)[0]
        if entries > limits.max_tiff_tags:
            raise _too_complex("TIFF tags in a page", entries, limits.max_tiff_tags, "too_many_tags")
        table = offset + count_size
        if table + entries * entry_size + struct.calcsize(next_fmt) > len(data):
            break  # truncated: the decoder will say so
        for i in range(entries):
            tag, _type, count, _value = struct.unpack_from(order + entry_fmt, data, table + i * entry_size)
            if tag in _TIFF_STRIP_TAGS:
                most = max(most, count)
                if count > limits.max_tiff_strips:
                    raise _too_complex(
                        "TIFF strips or tiles", count, limits.max_tiff_strips, "too_many_strips"
                    )
            elif tag == _TIFF_SUBIFDS and count > limits.max_frames:
                raise _too_complex("sub-images", count, limits.max_frames, "too_many_frames")
        offset = struct.unpack_from(order + next_fmt, data, table + entries * entry_size)[0]
    return pages, most


def _check_tiff(data: bytes, limits: LimitsConfig) -> None:
    tiff_counts(data, limits)


# ISO base media (HEIF, AVIF): top-level boxes, and the item count of the `meta` box, which
# names every tile of a grid image and every auxiliary image libheif would consider.
def _check_isobmff(data: bytes, limits: LimitsConfig) -> None:
    pos, end, boxes = 0, len(data), 0
    while pos + 8 <= end:
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        boxes += 1
        if boxes > limits.max_chunks:
            raise _too_complex("boxes", boxes, limits.max_chunks, "too_many_chunks")
        if kind == b"meta":
            _check_meta_items(data, pos + header + 4, min(pos + size, end), limits)
        if size < header:
            break
        pos += size


def _check_meta_items(data: bytes, pos: int, end: int, limits: LimitsConfig) -> None:
    boxes = 0
    while pos + 8 <= end:
        size = int.from_bytes(data[pos:pos + 4], "big")
        boxes += 1
        if size < 8 or boxes > limits.max_chunks:
            return
        if data[pos + 4:pos + 8] == b"iinf" and pos + 14 <= end:
            version = data[pos + 8]
            count = (
                int.from_bytes(data[pos + 12:pos + 14], "big")
                if version == 0
                else int.from_bytes(data[pos + 12:pos + 16], "big")
            )
            if count > limits.max_heif_items:
                raise _too_complex("HEIF items", count, limits.max_heif_items, "too_many_frames")
            return
        pos += size


_WALKERS = {
    "jpeg": _check_jpeg,
    "png": _check_png,
    "webp": _check_webp,
    "tiff": _check_tiff,
    "heif": _check_isobmff,
    "avif": _check_isobmff,
}
