"""Plain helpers of the load tests, free of Locust: importing Locust patches the whole
process with gevent, which must never happen in a test run or in the sampling runner."""

from __future__ import annotations

import random
import struct
import zlib


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A small RGB PNG of smooth gradients and noise (no codec library needed)."""
    rnd = random.Random(seed)
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter type: none
        for x in range(width):
            n = rnd.randrange(32)
            row += bytes(((x * 255 // max(width - 1, 1) + n) % 256,
                          (y * 255 // max(height - 1, 1) + n) % 256,
                          (128 + n) % 256))
        rows.append(bytes(row))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))


def parse_stages(text: str) -> list[tuple[float, int]]:
    """``"30:8,60:8,30:0"`` -> [(30.0, 8), (60.0, 8), (30.0, 0)]."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        seconds, _, users = part.partition(":")
        stages.append((float(seconds), int(users)))
        if stages[-1][0] <= 0 or stages[-1][1] < 0:
            raise ValueError(f"bad stage {part!r}: want seconds>0:users>=0")
    return stages


def stage_tick(stages: list[tuple[float, int]], t: float) -> tuple[int, float] | None:
    """(users, spawn rate) at ``t`` seconds: each stage moves linearly to its count, reaching
    it at the stage's end; None after the last stage (the test ends)."""
    start, users = 0.0, 0
    for seconds, target in stages:
        if t < start + seconds:
            return target, max(abs(target - users) / seconds, 0.1)
        start, users = start + seconds, target
    return None
