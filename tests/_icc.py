"""ICC profiles made at test time: matrix-shaper v2 profiles from published primaries.

Display P3 (DCI-P3 primaries, D65, the sRGB curve) and Adobe RGB (1998) (its primaries, D65,
gamma 563/256) are built from their definitions, colorants adapted to the D50 PCS with the
Bradford transform, as ICC profiles require. ``expected`` computes a colour's conversion
independently of LittleCMS, for the tests to compare with.
"""

from __future__ import annotations

import struct

import numpy as np

D65 = np.array([0.95047, 1.0, 1.08883])
D50 = np.array([0.96422, 1.0, 0.82521])
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])

PRIMARIES = {
    "srgb": ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)),
    "p3": ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)),
    "adobe": ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)),
}


def srgb_curve(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def srgb_inverse(y: np.ndarray) -> np.ndarray:
    return np.where(y <= 0.0031308, y * 12.92, 1.055 * np.power(np.clip(y, 0, None), 1 / 2.4) - 0.055)


ADOBE_GAMMA = 563 / 256


def to_linear(space: str, x: np.ndarray) -> np.ndarray:
    return x**ADOBE_GAMMA if space == "adobe" else srgb_curve(x)


def rgb_to_xyz(space: str, white: np.ndarray = D65) -> np.ndarray:
    xy = np.array(PRIMARIES[space])
    xyz = np.stack([xy[:, 0] / xy[:, 1], np.ones(3), (1 - xy[:, 0] - xy[:, 1]) / xy[:, 1]])
    scale = np.linalg.solve(xyz, white)
    return xyz * scale


def _adapt(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    a, b = _BRADFORD @ src, _BRADFORD @ dst
    return np.linalg.inv(_BRADFORD) @ np.diag(b / a) @ _BRADFORD


def expected_srgb(space: str, rgb8: tuple[int, int, int]) -> np.ndarray:
    """The sRGB value (0..255 float) of an 8-bit colour of ``space``."""
    lin = to_linear(space, np.array(rgb8, dtype=np.float64) / 255.0)
    xyz = rgb_to_xyz(space) @ lin
    out = np.linalg.solve(rgb_to_xyz("srgb"), xyz)
    return srgb_inverse(np.clip(out, 0, 1)) * 255.0


def lab(rgb_srgb255: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of an sRGB colour given 0..255, for ΔE."""
    xyz = rgb_to_xyz("srgb") @ srgb_curve(np.asarray(rgb_srgb255, dtype=np.float64) / 255.0)
    t = xyz / D65
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(lab(a) - lab(b)))


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz_tag(xyz: np.ndarray) -> bytes:
    return b"XYZ \x00\x00\x00\x00" + b"".join(_s15(v) for v in xyz)


def _curve_tag(space: str) -> bytes:
    if space == "adobe":
        return b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, 0x0233) + b"\x00\x00"
    table = np.round(srgb_curve(np.linspace(0, 1, 1024)) * 65535).astype(">u2").tobytes()
    return b"curv\x00\x00\x00\x00" + struct.pack(">I", 1024) + table


def _desc_tag(text: str) -> bytes:
    ascii_ = text.encode() + b"\x00"
    body = b"desc\x00\x00\x00\x00" + struct.pack(">I", len(ascii_)) + ascii_
    body += struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\x00" * 67
    return body


def make_profile(space: str) -> bytes:
    """An ICC v2 display profile (matrix-shaper) for ``space``: 'p3' or 'adobe'."""
    name = {"p3": "Display P3 (test)", "adobe": "Adobe RGB (1998) (test)", "srgb": "sRGB-like (test)"}[space]
    colorants = _adapt(D65, D50) @ rgb_to_xyz(space)
    curve = _curve_tag(space)
    tags = [
        (b"desc", _desc_tag(name)),
        (b"cprt", b"text\x00\x00\x00\x00No copyright, test data\x00"),
        (b"wtpt", _xyz_tag(D50)),
        (b"rXYZ", _xyz_tag(colorants[:, 0])),
        (b"gXYZ", _xyz_tag(colorants[:, 1])),
        (b"bXYZ", _xyz_tag(colorants[:, 2])),
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += b"\x00" * (-len(body) % 4)
        table += struct.pack(">4sII", sig, offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I4sI4s4s4s", size, b"lcms", 0x02100000, b"mntr", b"RGB ", b"XYZ ")
    header += struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"APPL" + b"\x00" * 4
    header += b"\x00" * 8 + b"\x00" * 8 + struct.pack(">I", 0)
    header += b"".join(_s15(v) for v in D50) + b"\x00" * 4 + b"\x00" * 16 + b"\x00" * 28
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data
