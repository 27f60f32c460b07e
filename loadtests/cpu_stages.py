"""CPU cost per stage of one 512 px photo with two faces at x2, for docs/CAPACITY.md.

    .venv/bin/python loadtests/cpu_stages.py --repeats 20

Every figure is the median CPU time of the calling thread (``time.thread_time``), not wall
time, so other work on the machine changes it little. The stages are those that stay on the
CPU when the networks run on a GPU: the ingress's header probe, decoding, aligning the two
faces (landmarks -> similarity transform -> 512x512 warp), pasting them back into the 2x
background (inverse warps and the blend), and encoding (JPEG quality 95, PNG as configured,
and PNG as it was: zlib level 3 with libpng's adaptive filters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app import codec  # noqa: E402
from serve_app.config import AppConfig  # noqa: E402
from serve_app.engine import detect, paste  # noqa: E402

PHOTO = ROOT.parent / "shared" / "data" / "images" / "Adele_crop.png"


def cpu_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm caches and lazy imports
    samples = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        samples.append(1000 * (time.thread_time() - t0))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    opts = p.parse_args(argv)
    n = opts.repeats
    limits = AppConfig().limits

    img = cv2.resize(cv2.imread(str(PHOTO), cv2.IMREAD_COLOR), (512, 512))
    jpeg = codec.encode(img, "jpeg", 90)
    # Two faces: the alignment template placed at two spots of the photo, as a detector's
    # landmarks would be.
    marks = [detect.FACE_TEMPLATE * s + o for s, o in ((0.45, (20, 40)), (0.4, (280, 260)))]
    aligned = [detect.align(img, m.astype(np.float32)) for m in marks]
    background = cv2.resize(img, (1024, 1024), interpolation=cv2.INTER_LANCZOS4)
    mask = np.ones((512, 512), np.float64)
    mask[:10], mask[-10:], mask[:, :10], mask[:, -10:] = 0, 0, 0, 0
    faces = [paste.Face(crop, affine, mask) for crop, affine in aligned]
    result = paste.paste(background, faces, 2)
    old_png = [cv2.IMWRITE_PNG_COMPRESSION, 3]

    stages = {
        "probe (ingress)": cpu_ms(lambda: codec.probe(jpeg, limits, 2), n),
        "decode 512 px JPEG": cpu_ms(lambda: codec.decode(jpeg), n),
        "align 2 faces": cpu_ms(lambda: [detect.align(img, m.astype(np.float32)) for m in marks], n),
        "paste 2 faces into 1024 px": cpu_ms(lambda: paste.paste(background, faces, 2), n),
        "encode 1024 px JPEG q95": cpu_ms(lambda: codec.encode(result, "jpeg", 95), n),
        "encode 1024 px PNG (configured)": cpu_ms(lambda: codec.encode(result, "png"), n),
        "encode 1024 px PNG (zlib 3, before)": cpu_ms(lambda: cv2.imencode(".png", result, old_png), n),
    }
    sizes = {
        "jpeg_in": len(jpeg),
        "jpeg_out": len(codec.encode(result, "jpeg", 95)),
        "png_out": len(codec.encode(result, "png")),
        "png_out_before": len(cv2.imencode(".png", result, old_png)[1]),
    }
    for name, ms in stages.items():
        print(f"{name:<38} {ms:8.2f} ms")
    print(json.dumps({"cpu_ms": stages, "bytes": sizes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
