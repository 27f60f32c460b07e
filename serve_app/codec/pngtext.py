"""A PNG's text chunks, bounded before Pillow opens the file (docs/SECURITY.md, "Metadata"):
every ``tEXt``/``zTXt``/``iTXt`` but the first XMP is removed unread (a ``zTXt`` would be
inflated by Pillow whatever its use), and an ``iCCP`` or the XMP over its cap is measured
without inflating more than one byte past it."""

from __future__ import annotations

import zlib

from serve_app.codec.metadata import MAX_EXIF_BYTES, MAX_ICC_BYTES, MAX_XMP_BYTES, too_large

_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_PNG_XMP_KEYWORD = b"XML:com.adobe.xmp"


def png_for_pillow(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    """The PNG as Pillow may open it, and the blocks dropped on the way.

    One walk over the chunk headers: text chunks are removed (none but the first XMP
    ``iTXt`` is carried to the output; this way no ``zTXt`` is ever inflated), and so is an
    XMP over ``MAX_XMP_BYTES``. An ICC profile (``iCCP``, measured by inflating at most one
    byte past the cap) or an ``eXIf`` over its cap is refused. The bytes are copied only when
    a chunk is removed.
    """
    parts: list[bytes] = []
    dropped: set[str] = set()
    kept_from, pos, xmp_seen = 0, 8, False
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body, end = pos + 8, pos + 12 + length
        if kind == b"IEND" or end > len(data):
            break  # the rest is the decoder's to judge
        if kind == b"iCCP":
            name_end = data.find(b"\0", body, min(body + 80, end - 4))  # name, NUL, method
            size = _inflated_size(data, name_end + 2, end - 4, MAX_ICC_BYTES) if name_end >= 0 else 0
            if size > MAX_ICC_BYTES:
                raise too_large("icc", size, MAX_ICC_BYTES)
        elif kind == b"eXIf" and length > MAX_EXIF_BYTES:
            raise too_large("exif", length, MAX_EXIF_BYTES)
        elif kind in _PNG_TEXT:
            keep = False
            if kind == b"iTXt" and not xmp_seen and data.startswith(_PNG_XMP_KEYWORD + b"\0", body):
                xmp_seen = True
                keep = _itxt_size(data, body + len(_PNG_XMP_KEYWORD) + 1, end - 4) <= MAX_XMP_BYTES
                if not keep:
                    dropped.add("xmp")  # logged where it is decoded (``read_metadata``)
            if not keep:
                parts.append(data[kept_from:pos])
                kept_from = end
        pos = end
    if not parts:
        return data, ()
    parts.append(data[kept_from:])
    return b"".join(parts), tuple(sorted(dropped))


def _itxt_size(data: bytes, pos: int, end: int) -> int:
    """The text size of an iTXt body from after its keyword: flag, method, language\0,
    translated keyword\0, text (inflated when the flag says so)."""
    if pos + 2 > end:
        return 0
    compressed = data[pos]
    lang_end = data.find(b"\0", pos + 2, end)
    text = data.find(b"\0", lang_end + 1, end) + 1 if lang_end >= 0 else 0
    if text <= 0:
        return 0
    if not compressed:
        return end - text
    return _inflated_size(data, text, end, MAX_XMP_BYTES)


def _inflated_size(data: bytes, start: int, end: int, limit: int) -> int:
    """How many bytes ``data[start:end]`` inflates to, counting no further than ``limit + 1``
    (so the work is bounded by the cap, whatever the ratio); 0 when it is not zlib data."""
    if start < 0 or start >= end:
        return 0
    try:
        return len(zlib.decompressobj().decompress(data[start:end], limit + 1))
    except zlib.error:
        return 0
