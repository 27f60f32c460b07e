"""ICC profiles the codec writes itself (no imports from the rest of the codec, so both
``metadata`` and ``color`` may use them)."""

from __future__ import annotations

import functools
import struct


def build(space: bytes, tags: list[tuple[bytes, bytes]], year: int = 1999) -> bytes:
    """An ICC v2 display profile of colour space ``space`` (``b"RGB "``, ``b"GRAY"``) from its
    tags' (signature, body) pairs: header, tag table, 4-byte aligned bodies."""
    offset, table, body = 132 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += struct.pack(">4sII", sig, offset + len(body), len(data))
        body += data
    header = struct.pack(">I4sI4s4s4s", offset + len(body), b"none", 0x02100000, b"mntr",
                         space, b"XYZ ")
    header += struct.pack(">6H", year, 1, 1, 0, 0, 0) + b"acsp" + bytes(28)  # ..., intent
    header += struct.pack(">3i", 63190, 65536, 54061) + bytes(48)  # the D50 illuminant
    return header + struct.pack(">I", len(tags)) + table + body


def xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + struct.pack(">3i", *(round(v * 65536) for v in (x, y, z)))


def gamma_curve(gamma_256ths: int) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, gamma_256ths) + b"\0\0"


def description(text: str) -> bytes:
    name = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(name)) + name + bytes(4 + 4 + 3 + 67)


@functools.cache
def adobe_rgb_profile() -> bytes:
    """An ICC v2 matrix-shaper profile of Adobe RGB (1998): its D50-adapted colorants and
    gamma 563/256 as Adobe's specification publishes them (LittleCMS, through ImageCms, only
    builds sRGB and Lab, so the profile's 9 tags are written here)."""
    curve = gamma_curve(0x0233)
    return build(b"RGB ", [
        (b"desc", description("Adobe RGB (1998)")),
        (b"cprt", b"text\0\0\0\0Public domain\0"),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.6097559, 0.3111145, 0.0194702)),
        (b"gXYZ", xyz(0.2052401, 0.6256714, 0.0608902)),
        (b"bXYZ", xyz(0.1492240, 0.0632172, 0.7445396)),
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
    ])
