"""``photoenhance enhance FILE... --out DIR``: send files to a running server, concurrently."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import click

from serve_app.options import OUTPUT_FORMATS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def expand_paths(paths: tuple[Path, ...]) -> list[Path]:
    """Files as given; a folder contributes its image files (not recursively)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out


@click.command("enhance")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the results (created if missing).")
@click.option("--server", default="http://127.0.0.1:8000", show_default=True,
              envvar="PHOTOENHANCE_SERVER", help="Base URL of a running server.")
@click.option("--upscale", type=click.Choice(["1", "2", "4"]), default=None)
@click.option("--face/--no-face", default=None, help="Restore faces (default: on).")
@click.option("--face-model", default=None, help="GFPGANv1.3 or GFPGANv1.4.")
@click.option("--bg-model", default=None, help="auto, none, RealESRGAN_x2plus, ...")
@click.option("--weight", type=float, default=None, help="GFPGAN fidelity weight, 0..1.")
@click.option("--only-center-face", is_flag=True, default=None)
@click.option("--aligned", is_flag=True, default=None, help="Inputs are aligned 512x512 faces.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None)
@click.option("--quality", type=int, default=None)
@click.option("--tile", type=int, default=None)
@click.option("--preset", default=None)
@click.option("-j", "--concurrency", type=int, default=4, show_default=True)
@click.option("--retries", type=int, default=5, show_default=True, help="Retries on 503.")
@click.option("--overwrite/--skip-existing", default=True, show_default=True)
def enhance_cmd(
    files: tuple[Path, ...], out_dir: Path, server: str, concurrency: int, retries: int,
    overwrite: bool, fmt: str | None, **options: Any,
) -> None:
    """Enhance FILES (or the images in folders) through the server at --server."""
    from tqdm import tqdm

    from serve_app.client import ApiError, Client

    options["format"] = fmt
    options = {k: v for k, v in options.items() if v is not None}
    paths = expand_paths(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    synthetic = False

    def one(path: Path) -> str:
        nonlocal synthetic
        existing = list(out_dir.glob(f"{path.stem}.*"))
        if existing and not overwrite:
            return f"skipped (exists: {existing[0].name})"
        result = client.enhance(path.read_bytes(), filename=path.name, **options)
        synthetic = synthetic or result.synthetic
        target = out_dir / f"{path.stem}.{'jpg' if result.format == 'jpeg' else result.format}"
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_bytes(result.data)
        tmp.replace(target)
        return f"{target.name} {result.width}x{result.height}, {result.faces} faces"

    with Client(server, retries=retries) as client, ThreadPoolExecutor(
        max_workers=max(1, concurrency)
    ) as pool, tqdm(total=len(paths), unit="img", desc="enhance") as bar:
        futures = {pool.submit(one, p): p for p in paths}
        for future in as_completed(futures):
            path = futures[future]
            try:
                bar.set_postfix_str(f"{path.name}: {future.result()}"[:60])
            except ApiError as exc:
                failures.append((path, f"{exc.status} {exc.code}: {exc.message}"))
            except Exception as exc:  # network errors, unreadable files
                failures.append((path, f"{type(exc).__name__}: {exc}"))
            bar.update()
    for path, why in failures:
        click.echo(f"FAILED {path}: {why}", err=True)
    if synthetic:
        click.echo("WARNING: the server runs SYNTHETIC weights; outputs are not real "
                   "restorations.", err=True)
    click.echo(f"{len(paths) - len(failures)} of {len(paths)} enhanced into {out_dir}")
    if failures:
        sys.exit(1)


COMMANDS = [enhance_cmd]
