"""``photoenhance verify-upstream`` and ``photoenhance bench``: the engine against upstream."""

from __future__ import annotations

import contextlib
import io
import json
import platform
import resource
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


@click.command("bench")
@click.option("--profile", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", "batches", default="1,4,8,16,32", show_default=True)
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("../shared/data/images"), show_default=True)
@click.option("--max-side", type=int, default=0, help="Downscale inputs to fit (0: as they are).")
@click.option("--upscale", type=click.Choice(["1", "2", "4"]), default="2", show_default=True)
@click.option("--no-upstream", is_flag=True, help="Time the batched engine only.")
@click.option("--json", "as_json", is_flag=True)
@_WEIGHTS
def bench(profile, device, batches, images_dir, max_side, upscale, no_upstream, as_json,
          weights_dir) -> None:
    """Images/s and faces/s of the batched engine and of upstream one-by-one."""
    import torch

    from serve_app.engine.upstream import Reference
    from serve_app.options import EnhanceOptions

    eng = _engine(profile, device, weights_dir)
    ref = Reference.sharing(eng)
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in _EXTS)
    pool = [_read(p, max_side) for p in paths]
    if not pool:
        raise click.ClickException(f"no images in {images_dir}")
    opt = EnhanceOptions(upscale=int(upscale))
    eng.warmup([opt])
    with _quiet():
        ref.enhance(pool[0], opt)
    info = eng.info()
    rows = []
    for n in [int(b) for b in batches.split(",") if b.strip()]:
        imgs = [pool[i % len(pool)] for i in range(n)]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = eng.enhance_batch(imgs, [opt] * n)
        if device == "cuda":
            torch.cuda.synchronize()
        tb = time.perf_counter() - t0
        faces = sum(getattr(r, "faces", 0) for r in res)
        row = {"batch": n, "images_per_s": n / tb, "faces_per_s": faces / tb, "seconds": tb,
               "faces": faces, "peak_mb": _peak_mb(eng.device)}
        if not no_upstream:
            t0 = time.perf_counter()
            with _quiet():
                for img in imgs:
                    ref.enhance(img, opt)
            if device == "cuda":
                torch.cuda.synchronize()
            tu = time.perf_counter() - t0
            row.update(upstream_images_per_s=n / tu, upstream_faces_per_s=faces / tu,
                       upstream_seconds=tu, speedup=tu / tb)
        rows.append(row)
        if as_json:
            click.echo(json.dumps({**row, "device": info["device_name"], "profile": profile,
                                   "upscale": int(upscale), "threads": torch.get_num_threads()}))
    if not as_json:
        click.echo(f"device: {info['device_name']} ({platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads), profile: {profile}, x{upscale}, "
                   f"images: {images_dir} ({len(pool)} files, max side {max_side or 'as is'})")
        click.echo(f"{'batch':>5} {'img/s':>8} {'faces/s':>8} {'up img/s':>9} {'ratio':>6} {'peak MB':>8}")
        for r in rows:
            click.echo(f"{r['batch']:>5} {r['images_per_s']:>8.2f} {r['faces_per_s']:>8.2f} "
                       f"{r.get('upstream_images_per_s', float('nan')):>9.2f} "
                       f"{r.get('speedup', float('nan')):>6.2f} {r['peak_mb']:>8.0f}")


COMMANDS = [verify_upstream, bench]
