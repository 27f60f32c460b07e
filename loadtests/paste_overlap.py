"""How much of a model replica's time its device is held: batches one after the other, with
paste inside the device lock (as the replica ran before), and with each batch's paste overlapping
the next batch's device stages (as the replica runs now: ``Engine.forward_batch`` under the
lock, ``Engine.finish_batch`` outside it).

    .venv/bin/python loadtests/paste_overlap.py [--batches 8] [--batch 4] [--side 512]
        [--profile tiny|full] [--device cpu|cuda] [--weights-dir DIR] [--json F]

Photos from ``../shared/data/images`` (downscaled to ``--side``), x2 with faces on. For each
mode: images per second, and the share of wall time the device lock is held (the device
stages' seconds over the wall time): on a GPU, the share the GPU can be busy. Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.cli.bench import _engine, _read  # noqa: E402
from serve_app.options import EnhanceOptions  # noqa: E402

PHOTOS = ["Blake_Lively.jpg", "0014.jpg", "10045.png", "children-alpha.png"]


def serial(engine: Any, batches: list[list[Any]], opt: list[EnhanceOptions]) -> dict[str, float]:
    """Each batch whole under the lock: device stages, then paste, then the next batch."""
    held = 0.0
    t0 = time.perf_counter()
    for imgs in batches:
        t = time.perf_counter()
        engine.finish_batch(engine.forward_batch(imgs, opt[: len(imgs)]))
        held += time.perf_counter() - t
    return _figures(batches, held, time.perf_counter() - t0)


def overlapped(engine: Any, batches: list[list[Any]], opt: list[EnhanceOptions]) -> dict[str, float]:
    """The lock held for the device stages only; a batch pastes in another thread while the
    next one is on the device (at most one pasting, as the replica's bound)."""
    held = 0.0
    pasting: threading.Thread | None = None
    t0 = time.perf_counter()
    for imgs in batches:
        t = time.perf_counter()
        staged = engine.forward_batch(imgs, opt[: len(imgs)])
        held += time.perf_counter() - t
        if pasting is not None:
            pasting.join()
        pasting = threading.Thread(target=engine.finish_batch, args=(staged,))
        pasting.start()
    if pasting is not None:
        pasting.join()
    return _figures(batches, held, time.perf_counter() - t0)


def _figures(batches: list[list[Any]], held: float, wall: float) -> dict[str, float]:
    n = sum(len(b) for b in batches)
    return {"images_per_s": round(n / wall, 2), "wall_s": round(wall, 3),
            "device_held_s": round(held, 3), "device_held_share": round(held / wall, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    weights = args.weights_dir or Path(tempfile.mkdtemp(prefix="pe-weights-"))
    engine = _engine(args.profile, args.device, weights)
    photos = ROOT.parent / "shared" / "data" / "images"
    imgs = [_read(photos / name, args.side) for name in PHOTOS]
    imgs = [i[:, :, :3] if i.ndim == 3 else i for i in imgs]
    batches = [[imgs[(b * args.batch + k) % len(imgs)] for k in range(args.batch)]
               for b in range(args.batches)]
    opt = [EnhanceOptions(upscale=2)] * args.batch

    staged = engine.forward_batch(batches[0], opt)  # warm-up, and one batch's stage times
    stages = next(r.timings for r in engine.finish_batch(staged) if hasattr(r, "timings"))
    runs = {"serial": serial(engine, batches, opt), "overlapped": overlapped(engine, batches, opt)}
    report = {
        "machine": f"{platform.machine()}, {engine.info().get('device')}, profile {args.profile}",
        "batches": args.batches, "batch": args.batch, "side": args.side, "upscale": 2,
        "one_batch_stage_s": {k: round(v, 4) for k, v in stages.items()},
        **runs,
        "speedup": round(runs["overlapped"]["images_per_s"] / runs["serial"]["images_per_s"], 3),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
