"""CPU cost per stage of one 512 px photo with two faces at x2, for docs/CAPACITY.md.

    .venv/bin/python loadtests/cpu_stages.py --repeats 20 [--only paste] [--device cuda]

Every figure is CPU time of the whole process (``time.process_time``: every thread, so
OpenCV's and torch's worker threads count too), not wall time, so other work on the machine
changes it less; each stage is repeated and reported as median, min and max, with the load
average at the time. ``--device cuda`` adds paste with the warps and blend on the GPU
(``engine.paste_on_device``; CPU time of the process, the device synchronised). The stages are those that stay on the
CPU when the networks run on a GPU: the ingress's header probe, decoding, aligning the two
faces (landmarks -> similarity transform -> 512x512 warp), pasting them back into the 2x
background (inverse warps and the blend), and encoding (JPEG quality 95, PNG as configured,
and PNG as it was: zlib level 3 with libpng's adaptive filters).
"""

from __future__ import annotations

import argparse
import json
import os
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


def cpu_ms(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    fn()  # warm caches and lazy imports
    samples = []
    load = os.getloadavg()[0]
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        samples.append(1000 * (time.process_time() - t0))
    return {"median": round(statistics.median(samples), 2), "min": round(min(samples), 2),
            "max": round(max(samples), 2), "load": round((load + os.getloadavg()[0]) / 2, 1)}


def upstream_paste(background: np.ndarray, faces: list[paste.Face], upscale: int) -> np.ndarray:
    """FaceRestoreHelper.paste_faces_to_input_image's arithmetic: every face and mask warped
    over the whole output, the whole image blended in float64 per face."""
    h, w = background.shape[:2]
    img = background.astype(np.float64)
    for f in faces:
        inv = paste.inverse(f.affine, upscale)
        face = cv2.warpAffine(f.restored, inv, (w, h))
        mask = cv2.warpAffine(f.mask, inv, (w, h), flags=cv2.INTER_CUBIC)[:, :, None]
        img = mask * face + (1 - mask) * img
    return img.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--only", default="", help="Run only the stages whose name contains this.")
    p.add_argument("--device", default="", help="Also paste on this torch device (cuda).")
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
    # a parser's soft mask as restore.paste_masks makes it (classes 0/255, blurred twice,
    # 10 px border cleared)
    mask = np.full((512, 512), 255.0)
    mask[330:420, 150:360] = 0
    mask = cv2.GaussianBlur(cv2.GaussianBlur(mask, (101, 101), 11), (101, 101), 11)
    mask[:10], mask[-10:], mask[:, :10], mask[:, -10:] = 0, 0, 0, 0
    mask /= 255.0
    faces = [paste.Face(crop, affine, mask) for crop, affine in aligned]
    result = paste.paste(background, faces, 2)
    old_png = [cv2.IMWRITE_PNG_COMPRESSION, 3]

    todo: dict[str, Callable[[], Any]] = {
        "probe (ingress)": lambda: codec.probe(jpeg, limits, 2),
        "decode 512 px JPEG": lambda: codec.decode(jpeg),
        "align 2 faces": lambda: [detect.align(img, m.astype(np.float32)) for m in marks],
        "paste 2 faces into 1024 px": lambda: paste.paste(background, faces, 2),
        "paste, upstream's full-image arithmetic": lambda: upstream_paste(background, faces, 2),
        "encode 1024 px JPEG q95": lambda: codec.encode(result, "jpeg", 95),
        "encode 1024 px PNG (configured)": lambda: codec.encode(result, "png"),
        "encode 1024 px PNG (zlib 3, before)": lambda: cv2.imencode(".png", result, old_png),
    }
    if opts.device:
        import torch

        from serve_app.engine import paste_device

        dev = torch.device(opts.device)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def on_device() -> None:
            paste_device.paste(background, faces, 2, dev)
            sync()

        todo[f"paste 2 faces into 1024 px on {opts.device}"] = on_device
    want = upstream_paste(background, faces, 2)
    diff = {"paste": int(np.abs(result.astype(int) - want).max())}
    if opts.device:
        got = paste_device.paste(background, faces, 2, dev)
        diff["paste_device"] = int(np.abs(got.astype(int) - want).max())
    stages = {name: cpu_ms(fn, n) for name, fn in todo.items() if opts.only in name}
    sizes = {
        "jpeg_in": len(jpeg),
        "jpeg_out": len(codec.encode(result, "jpeg", 95)),
        "png_out": len(codec.encode(result, "png")),
        "png_out_before": len(cv2.imencode(".png", result, old_png)[1]),
    }
    for name, ms in stages.items():
        print(f"{name:<42} {ms['median']:8.2f} ms ({ms['min']:.2f}..{ms['max']:.2f}, "
              f"load {ms['load']})")
    print(json.dumps({"cpu_ms": stages, "bytes": sizes, "max_diff_to_upstream": diff,
                      "opencv_threads": cv2.getNumThreads()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
