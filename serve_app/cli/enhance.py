"""``photoenhance enhance FILE... --out DIR``: send files to a running server, concurrently."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import click

from serve_app.options import OUTPUT_FORMATS

IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
}


def expand_paths(paths: tuple[Path, ...]) -> list[Path]:
    """Files as given; a folder contributes its image files (not recursively)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """A distinct output stem per input: the input's stem, its whole name where two inputs
    share a stem (``image.bmp`` -> ``image.bmp.png``), and a ``-2``, ``-3``... suffix where
    even that collides (``a/x.jpg``, ``b/x.jpg``). Compared without case, as some file
    systems do."""
    counts: dict[str, int] = {}
    for path in paths:
        counts[path.stem.lower()] = counts.get(path.stem.lower(), 0) + 1
    taken: set[str] = set()
    stems: dict[Path, str] = {}
    for path in paths:
        stem = path.stem if counts[path.stem.lower()] == 1 else path.name
        candidate, n = stem, 1
        while candidate.lower() in taken or (candidate != path.stem and candidate.lower() in counts):
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.lower())
        stems[path] = candidate
    return stems


def _existing(out_dir: Path, stem: str) -> str | None:
    """A finished output for ``stem`` (any extension), or None."""
    for entry in out_dir.iterdir():
        if entry.is_file() and not entry.name.startswith(".") and entry.stem == stem:
            return entry.name
    return None


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
@click.option("--metadata", type=click.Choice(["keep", "strip", "keep-no-gps"]), default=None,
              help="EXIF/XMP/IPTC in the outputs (default: the server's, usually keep).")
@click.option("--color", type=click.Choice(["keep", "srgb"]), default=None,
              help="keep: the input's ICC profile; srgb: convert to sRGB (default: keep).")
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
    paths = list(dict.fromkeys(expand_paths(files)))  # a file named twice is done once
    stems = output_stems(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    skipped: list[Path] = []
    synthetic = False

    def one(path: Path) -> str:
        nonlocal synthetic
        stem = stems[path]
        existing = _existing(out_dir, stem)
        if existing and not overwrite:
            skipped.append(path)
            return f"skipped (exists: {existing})"
        result = client.enhance(path.read_bytes(), filename=path.name, **options)
        synthetic = synthetic or result.synthetic
        target = out_dir / f"{stem}.{'jpg' if result.format == 'jpeg' else result.format}"
        if existing and existing != target.name:
            (out_dir / existing).unlink(missing_ok=True)  # --overwrite: one output per input
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
    written = len(paths) - len(failures) - len(skipped)
    click.echo(
        f"{written} of {len(paths)} written into {out_dir}"
        + (f", {len(skipped)} skipped (output exists)" if skipped else "")
        + (f", {len(failures)} failed" if failures else "")
    )
    if failures:
        sys.exit(1)


COMMANDS = [enhance_cmd]
