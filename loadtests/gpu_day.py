"""Everything a lent GPU should answer, in one run and one JSON (issue 18, item 5).

    .venv/bin/python loadtests/gpu_day.py --out "$OUT/gpu-day.json"           # on the device
    .venv/bin/python loadtests/gpu_day.py --device cpu --profile tiny --out /tmp/g.json  # plumbing

Synthetic weights at the chosen widths (``full``: the official architectures' sizes, so the
timings are the real networks'; no download), the shared photos at 512 px, x2 with faces:

1. ``batched``: images per second and device milliseconds per image at batch 1, 4, 8, 16
   (fp16 where the device is CUDA; ``engine.half``);
2. ``fp16_vs_fp32``: the same batch in both precisions, the largest and the 99.9th-percentile
   grey-level difference of the outputs (tolerance stated in the report: the upstream test's
   1 level is for fp32 against fp32; fp16 is judged at <= 3 levels at the 99.9th percentile);
3. ``nvjpeg``: a 12 MP JPEG decoded and encoded by nvJPEG and by OpenCV, times and the
   largest difference of the decodes (CUDA only);
4. ``oom_backoff``: a batch far past the memory budget (``memory_budget_mb`` set huge so the
   first chunk is too big) completes, with how many splits it took (CUDA only);
5. ``paste_overlap``: ``loadtests/paste_overlap.py``'s figures on the device.

Every step records an error instead of stopping the run, so one failure costs no device time
for the rest. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT.parent / "shared" / "data" / "images"
NAMES = ["Blake_Lively.jpg", "0014.jpg", "10045.png", "Adele_crop.png"]


def engine(wdir: Path, profile: str, device: str, **engine_args: Any) -> Any:
    from serve_app.config import AppConfig
    from serve_app.engine.engine import Engine

    cfg = AppConfig.model_validate({
        "weights": {"dir": str(wdir), "source": "synthetic", "profile": profile},
        "engine": {"device": device, "warmup": False, **engine_args},
    })
    return Engine.from_config(cfg)


def photos(side: int) -> list[np.ndarray]:
    import cv2

    out = []
    for name in NAMES:
        img = cv2.imread(str(PHOTOS / name), cv2.IMREAD_COLOR)
        f = side / max(img.shape[:2])
        out.append(cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)),
                              interpolation=cv2.INTER_AREA))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def batched(eng: Any, imgs: list[np.ndarray], device: str, sizes: list[int], repeats: int) -> dict[str, Any]:
    from serve_app.options import EnhanceOptions

    opt = EnhanceOptions(upscale=2)
    rows = {}
    for size in sizes:
        batch = (imgs * (size // len(imgs) + 1))[:size]
        eng.enhance_batch(batch, [opt] * size)  # warm-up: kernels, allocator, cuDNN choice
        rates, device_ms = [], []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            staged = eng.forward_batch(batch, [opt] * size)
            sync(device)
            t1 = time.perf_counter()
            eng.finish_batch(staged)
            t2 = time.perf_counter()
            rates.append(size / (t2 - t0))
            device_ms.append(1000 * (t1 - t0) / size)
        rows[str(size)] = {"images_per_s": statistics.median(rates), "runs": rates,
                           "device_ms_per_image": statistics.median(device_ms)}
    return rows


def precision(wdir: Path, profile: str, device: str, imgs: list[np.ndarray]) -> dict[str, Any]:
    from serve_app.options import EnhanceOptions

    opt = [EnhanceOptions(upscale=2)] * len(imgs)
    outs = {}
    for half in (False, True):
        res = engine(wdir, profile, device, half=half).enhance_batch(imgs, opt)
        outs[half] = [r.image for r in res]
    diffs = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()
                            for a, b in zip(outs[False], outs[True], strict=True)])
    p999 = float(np.percentile(diffs, 99.9))
    return {"max_levels": int(diffs.max()), "p99_9_levels": p999, "mean_levels": float(diffs.mean()),
            "tolerance": "p99.9 <= 3 levels", "within": p999 <= 3}


def nvjpeg(device: str) -> dict[str, Any]:
    import cv2

    from serve_app.engine.nvjpeg import GpuJpeg

    if device != "cuda":
        return {"skipped": "CUDA only"}
    big = cv2.resize(cv2.imread(str(PHOTOS / "10045.png"), cv2.IMREAD_COLOR), (4000, 3000))
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    gpu = GpuJpeg.probe(device)

    def timed(fn: Callable[[], Any], n: int = 10) -> tuple[float, Any]:
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        return 1000 * (time.perf_counter() - t0) / n, out

    gpu_dec_ms, gpu_img = timed(lambda: gpu._decode(data, "RGB"))
    cpu_dec_ms, cpu_img = timed(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    gpu_enc_ms, _ = timed(lambda: gpu._encode(big, 90))
    cpu_enc_ms, _ = timed(lambda: cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90]))
    diff = np.abs(gpu_img.astype(np.int16) - cpu_img.astype(np.int16))
    return {"decode_ms": {"nvjpeg": gpu_dec_ms, "opencv": cpu_dec_ms},
            "encode_ms": {"nvjpeg": gpu_enc_ms, "opencv": cpu_enc_ms},
            "decode_max_levels": int(diff.max()), "decode_mean_levels": float(diff.mean())}


def oom_backoff(wdir: Path, profile: str, device: str, imgs: list[np.ndarray]) -> dict[str, Any]:
    from serve_app.options import EnhanceOptions

    if device != "cuda":
        return {"skipped": "CUDA only"}

    class Count(logging.Handler):
        splits = 0

        def emit(self, record: logging.LogRecord) -> None:
            if "out of memory" in record.getMessage():
                Count.splits += 1

    logging.getLogger("serve_app.engine.chunks").addHandler(Count())
    # A budget far past the device: the first chunk is the whole batch and must split.
    eng = engine(wdir, profile, device, memory_budget_mb=10_000_000, tile=2048)
    big = [np.ascontiguousarray(np.tile(imgs[0], (4, 4, 1)))] * 64
    t0 = time.perf_counter()
    res = eng.enhance_batch(big, [EnhanceOptions(upscale=4, face=False)] * len(big))
    return {"images": len(big), "ok": sum(1 for r in res if hasattr(r, "image")),
            "splits": Count.splits, "seconds": time.perf_counter() - t0}


def paste_overlap(wdir: Path, profile: str, device: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, str(ROOT / "loadtests" / "paste_overlap.py"),
                        "--device", device, "--profile", profile, "--weights-dir", str(wdir),
                        "--json", f.name], check=True, timeout=900)
        return json.loads(Path(f.name).read_text())


def step(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001 - one failure must not cost the rest of the run
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--profile", choices=["full", "tiny"], default="full")
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    opts = p.parse_args(argv)

    from serve_app.engine import synthetic

    report: dict[str, Any] = {"machine": f"{platform.machine()}, {platform.node()}",
                              "device": opts.device, "profile": opts.profile,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if opts.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
        report["torch"] = torch.__version__
    with tempfile.TemporaryDirectory(prefix="pe-gpu-") as tmp:
        wdir = Path(tmp)
        synthetic.synth(wdir, opts.profile)  # type: ignore[arg-type]
        imgs = photos(opts.side)
        sizes = [int(b) for b in opts.batches.split(",")]
        step(report, "batched", lambda: batched(engine(wdir, opts.profile, opts.device), imgs,
                                                opts.device, sizes, opts.repeats))
        step(report, "fp16_vs_fp32", lambda: precision(wdir, opts.profile, opts.device, imgs))
        step(report, "nvjpeg", lambda: nvjpeg(opts.device))
        step(report, "oom_backoff", lambda: oom_backoff(wdir, opts.profile, opts.device, imgs))
        step(report, "paste_overlap", lambda: paste_overlap(wdir, opts.profile, opts.device))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
