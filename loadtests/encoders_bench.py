"""CPU time and size of PNG and JPEG encoders on an upscaled photo, to choose ``encoding.*``.

    .venv/bin/python loadtests/encoders_bench.py
    # the candidates that are not dependencies, from a scratch folder:
    .venv/bin/pip install --target /tmp/enc fpng==0.1.0 pyspng-seunglab==1.1.3 \\
        simplejpeg==1.9.0 imagecodecs==2026.3.6
    PYTHONPATH=/tmp/enc .venv/bin/python loadtests/encoders_bench.py

Images: a 512 px photo upscaled x2 with Lanczos (1 MP, what a 512 px x2 request writes) and a
12 MP one (4000x3000, with mild noise like a camera's). Each figure is the median CPU time of
the calling thread over ``--repeats`` runs (``time.thread_time``: little affected by other
work on the machine). ``gil`` says whether the encoder lets other Python threads run while it
works (measured: a counting loop in the main thread while the encoder runs in another); one
that holds the GIL serialises the replica's codec threads and stalls its event loop.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app import codec  # noqa: E402

IMAGES = ROOT.parent / "shared" / "data" / "images"


def images() -> dict[str, np.ndarray]:
    small = cv2.imread(str(IMAGES / "Adele_crop.png"), cv2.IMREAD_COLOR)
    big = cv2.resize(cv2.imread(str(IMAGES / "10045.png"), cv2.IMREAD_COLOR), (4000, 3000),
                     interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(0).normal(0, 2.0, big.shape)
    big = np.clip(big + noise, 0, 255).astype(np.uint8)
    return {"1MP": cv2.resize(small, (1024, 1024), interpolation=cv2.INTER_LANCZOS4), "12MP": big}


def _pil(fmt: str, **save: Any) -> Callable[[np.ndarray], bytes]:
    def run(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(cv2.cvtColor(a, cv2.COLOR_BGR2RGB)).save(buf, fmt, **save)
        return buf.getvalue()

    return run


def _cv2_png(level: int, *extra: int) -> Callable[[np.ndarray], bytes]:
    return lambda a: cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, level, *extra])[1].tobytes()


def encoders() -> dict[str, Callable[[np.ndarray], bytes]]:
    huff = (cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY)
    rle = (cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE)
    paeth = (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH)
    up = (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP)
    out: dict[str, Callable[[np.ndarray], bytes]] = {
        "png opencv zlib 3 (before)": _cv2_png(3),
        "png opencv zlib 1": _cv2_png(1),
        "png opencv zlib 6": _cv2_png(6),
        "png opencv huffman+paeth (configured)": lambda a: codec.encode(a, "png"),
        "png opencv rle+paeth": _cv2_png(1, *rle, *paeth),
        "png opencv huffman+up": _cv2_png(1, *huff, *up),
        "png pillow (zlib-ng) 1": _pil("PNG", compress_level=1),
        "png pillow (zlib-ng) 3": _pil("PNG", compress_level=3),
        "jpeg opencv q95 (libjpeg-turbo, configured)": lambda a: codec.encode(a, "jpeg", 95),
        "jpeg pillow q95 (libjpeg-turbo)": _pil("JPEG", quality=95),
    }
    try:
        import fpng

        out["png fpng"] = lambda a: fpng.from_ndarray(np.ascontiguousarray(a[..., ::-1]))
    except ImportError:
        pass
    try:
        import pyspng

        out["png pyspng 1"] = lambda a: pyspng.encode(np.ascontiguousarray(a[..., ::-1]), compress_level=1)
    except ImportError:
        pass
    try:
        import imagecodecs

        out["png imagecodecs 1"] = lambda a: imagecodecs.png_encode(np.ascontiguousarray(a[..., ::-1]), level=1)
    except ImportError:
        pass
    try:
        import simplejpeg

        out["jpeg simplejpeg q95"] = lambda a: simplejpeg.encode_jpeg(a, quality=95, colorspace="BGR")
        out["jpeg simplejpeg q95 4:2:0"] = lambda a: simplejpeg.encode_jpeg(
            a, quality=95, colorspace="BGR", colorsubsampling="420")
    except ImportError:
        pass
    return out


def releases_gil(fn: Callable[[np.ndarray], bytes], image: np.ndarray) -> bool:
    """A counting loop in this thread while ``fn`` runs three times in another: if ``fn``
    holds the GIL this thread gets almost no CPU meanwhile (compared by thread CPU time, so
    other load on the machine does not decide it)."""
    cpu: dict[str, float] = {}
    done = threading.Event()

    def work() -> None:
        t0 = time.thread_time()
        for _ in range(3):
            fn(image)
        cpu["worker"] = time.thread_time() - t0
        done.set()

    t0 = time.thread_time()
    threading.Thread(target=work).start()
    while not done.is_set():
        pass
    cpu["main"] = time.thread_time() - t0
    return cpu["main"] > 0.3 * cpu["worker"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    opts = p.parse_args(argv)
    encs = encoders()
    for label, image in images().items():
        reps = opts.repeats if label == "1MP" else max(1, opts.repeats // 2)
        print(f"\n{label}: {image.shape[1]}x{image.shape[0]}")
        print(f"{'encoder':<46} {'cpu ms':>9} {'bytes':>11} {'gil':>5}")
        for name, fn in encs.items():
            fn(image)
            times = []
            for _ in range(reps):
                t0 = time.thread_time()
                data = fn(image)
                times.append(1000 * (time.thread_time() - t0))
            free = releases_gil(fn, image) if label == "1MP" else None
            gil = "" if free is None else ("free" if free else "held")
            print(f"{name:<46} {statistics.median(times):>9.1f} {len(bytes(data)):>11} {gil:>5}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
