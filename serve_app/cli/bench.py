"""``photoenhance verify-upstream`` and ``photoenhance bench``: the engine against upstream."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import click

_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def _engine(profile: str, device: str, weights_dir: Path | None):
    from serve_app.config import AppConfig, WeightsConfig
    from serve_app.engine.engine import Engine

    wdir = weights_dir or WeightsConfig().dir
    source = "synthetic" if profile == "tiny" else "official"
    cfg = AppConfig.model_validate(
        {"weights": {"dir": str(wdir), "source": source, "profile": profile},
         "engine": {"device": device}}
    )
    return Engine.from_config(cfg)


def _read(path: Path, max_side: int = 0):
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise click.ClickException(f"{path}: not a readable image")
    if max_side and max(img.shape[:2]) > max_side:
        f = max_side / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)),
                         interpolation=cv2.INTER_AREA)
    return img


def _quiet():
    # upstream RealESRGANer prints a line per tile
    return contextlib.redirect_stdout(io.StringIO())


_WEIGHTS = click.option("--weights-dir", type=click.Path(path_type=Path), default=None,
                        help="Weights folder (tiny: synthetic files are made under it).")


@click.command("verify-upstream")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--profile", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--upscale", type=click.Choice(["1", "2", "4"]), default="2", show_default=True)
@click.option("--face/--no-face", default=True, show_default=True)
@click.option("--aligned", is_flag=True, help="Inputs are aligned 512x512 faces.")
@click.option("--tolerance", type=int, default=1, show_default=True,
              help="Largest accepted difference, in 8-bit grey levels.")
@_WEIGHTS
def verify_upstream(images, profile, upscale, face, aligned, tolerance, weights_dir) -> None:
    """Run the batched engine and upstream's one-image path; one JSON line per image."""
    import numpy as np

    from serve_app.engine.upstream import Reference
    from serve_app.options import EnhanceOptions

    eng = _engine(profile, "cpu", weights_dir)
    ref = Reference.sharing(eng)
    opt = EnhanceOptions(upscale=int(upscale), face=face, aligned=aligned)
    imgs = [_read(p) for p in images]
    results = eng.enhance_batch(imgs, [opt] * len(imgs))
    failed = False
    for path, img, res in zip(images, imgs, results, strict=True):
        row = {"image": str(path), "profile": profile, "upscale": int(upscale)}
        if not hasattr(res, "image"):
            row.update(ok=False, error=res.to_dict())
            failed = True
        else:
            with _quiet():
                want, faces = ref.enhance(img, opt)
            d = np.abs(res.image.astype(np.int64) - want.astype(np.int64))
            # 16-bit with faces runs at 8 bits: one 8-bit level is 257 there
            unit = 257 if img.dtype == np.uint16 else 1
            limit = tolerance * unit
            ok = bool(d.max() <= limit)
            failed |= not ok
            row.update(max_abs_diff=int(d.max()), mean_abs_diff=float(d.mean()),
                       tolerance=limit, faces=res.faces, upstream_faces=faces, ok=ok)
        click.echo(json.dumps(row))
    sys.exit(1 if failed else 0)


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds of the whole process (every thread), user + system."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


_FORWARD = ("detect", "restore", "parse", "upsample")


def _bench_batch(eng, ref, imgs, opt, repeats: int, device: str, no_upstream: bool) -> dict:
    """One batch size: ``repeats`` runs of the engine then upstream; medians and spreads."""
    import torch

    n = len(imgs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs: list[dict[str, float]] = []
    load = []
    for _ in range(repeats):
        load.append(os.getloadavg()[0])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        c0, t0 = _cpu_s(), time.perf_counter()
        res = eng.enhance_batch(imgs, [opt] * n)
        sync()
        run = {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0,
               "faces": sum(getattr(r, "faces", 0) for r in res)}
        timings = next((r.timings for r in res if hasattr(r, "timings")), {})
        run["forward_s"] = sum(timings.get(k, 0.0) for k in _FORWARD)
        run["paste_s"] = timings.get("paste", 0.0)
        if not no_upstream:
            c0, t0 = _cpu_s(), time.perf_counter()
            with _quiet():
                for img in imgs:
                    ref.enhance(img, opt)
            sync()
            run["upstream_seconds"] = time.perf_counter() - t0
            run["upstream_cpu_s"] = _cpu_s() - c0
            run["ratio"] = run["upstream_seconds"] / run["seconds"]
        runs.append(run)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    faces = int(med["faces"])
    tb = med["seconds"]
    row = {"batch": n, "repeats": repeats, "images_per_s": n / tb, "faces_per_s": faces / tb,
           "seconds": tb, "faces": faces, "peak_mb": _peak_mb(eng.device),
           "cpu_ms_per_image": 1000 * med["cpu_s"] / n,
           "forward_s": med["forward_s"], "paste_s": med["paste_s"],
           "load_avg": _spread(load)}
    if not no_upstream:
        tu = med["upstream_seconds"]
        row.update(upstream_images_per_s=n / tu, upstream_faces_per_s=faces / tu,
                   upstream_seconds=tu, speedup=tu / tb,
                   ratio=_spread([r["ratio"] for r in runs]),
                   upstream_cpu_ms_per_image=1000 * med["upstream_cpu_s"] / n)
    return row


def _print_table(rows: list[dict], header: str) -> None:
    click.echo(header)
    click.echo(f"{'batch':>5} {'img/s':>7} {'faces/s':>7} {'up img/s':>8} "
               f"{'ratio (min..max)':>17} {'CPU ms/img':>10} {'up CPU ms':>9} "
               f"{'fwd s':>6} {'paste s':>7} {'peak MB':>7} {'load':>5}")
    nan = float("nan")
    for r in rows:
        spread = r.get("ratio", {"median": nan, "min": nan, "max": nan})
        click.echo(f"{r['batch']:>5} {r['images_per_s']:>7.2f} {r['faces_per_s']:>7.2f} "
                   f"{r.get('upstream_images_per_s', nan):>8.2f} "
                   f"{spread['median']:>5.2f} ({spread['min']:.2f}..{spread['max']:.2f}) "
                   f"{r['cpu_ms_per_image']:>10.0f} {r.get('upstream_cpu_ms_per_image', nan):>9.0f} "
                   f"{r['forward_s']:>6.2f} {r['paste_s']:>7.3f} {r['peak_mb']:>7.0f} "
                   f"{r['load_avg']['median']:>5.1f}")


@click.command("bench")
@click.option("--profile", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", "batches", default="1,4,8,16,32", show_default=True)
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("../shared/data/images"), show_default=True)
@click.option("--max-side", type=int, default=0, help="Downscale inputs to fit (0: as they are).")
@click.option("--upscale", type=click.Choice(["1", "2", "4"]), default="2", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of each batch (engine, then upstream, alternating): medians and spread.")
@click.option("--no-upstream", is_flag=True, help="Time the batched engine only.")
@click.option("--json", "as_json", is_flag=True)
@_WEIGHTS
def bench(profile, device, batches, images_dir, max_side, upscale, repeats, no_upstream, as_json,
          weights_dir) -> None:
    """Images/s and faces/s of the batched engine and of upstream one-by-one.

    Each batch runs ``--repeats`` times, the engine and upstream alternating so that other
    load on the machine falls on both; the row gives medians (images/s from the median
    seconds), the spread of the per-repeat ratio, the process's CPU ms per image (all
    threads: what a loaded machine changes least) and the engine's forward/paste split.
    """
    import cv2
    import torch

    from serve_app.engine.upstream import Reference
    from serve_app.options import EnhanceOptions

    eng = _engine(profile, device, weights_dir)
    ref = Reference.alongside(eng)  # upstream as it runs: its own networks, its own layout
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in _EXTS)
    pool = [_read(p, max_side) for p in paths]
    if not pool:
        raise click.ClickException(f"no images in {images_dir}")
    opt = EnhanceOptions(upscale=int(upscale))
    # Warm both on the real inputs, untimed: torch's CPU kernels (oneDNN) build their code
    # per input shape on first use, seconds on this profile. Warmed on a 64 px image only, the
    # engine (timed first) paid for every new shape and upstream, sharing the networks, ran
    # on them warm: that alone moved one run's ratio from 1.0 to 0.5 (docs/BENCHMARKS.md).
    eng.enhance_batch(pool, [opt] * len(pool))
    if not no_upstream:
        with _quiet():
            for img in pool:
                ref.enhance(img, opt)
    info = eng.info()
    rows = []
    for n in [int(b) for b in batches.split(",") if b.strip()]:
        imgs = [pool[i % len(pool)] for i in range(n)]
        row = _bench_batch(eng, ref, imgs, opt, repeats, device, no_upstream)
        rows.append(row)
        if as_json:
            click.echo(json.dumps({**row, "device": info["device_name"], "profile": profile,
                                   "upscale": int(upscale), "threads": torch.get_num_threads(),
                                   "cv2_threads": cv2.getNumThreads()}))
    if not as_json:
        _print_table(rows, f"device: {info['device_name']} ({platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} torch threads, {cv2.getNumThreads()} OpenCV "
                     f"threads), profile: {profile}, x{upscale}, images: {images_dir} "
                     f"({len(pool)} files, max side {max_side or 'as is'}), repeats: {repeats}")

COMMANDS = [verify_upstream, bench]
