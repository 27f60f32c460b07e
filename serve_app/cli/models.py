"""``photoenhance models``: add a model a person trusts (any file spandrel recognises, or an
ncnn pair), list and remove added models. See docs/MODELS.md."""

from __future__ import annotations

import json
from pathlib import Path

import click

from serve_app.config import WeightsConfig

_DIR = click.option(
    "--dir", "location", default=None,
    help="Folder or fsspec URL (s3://..., gs://...) holding added models and their "
    "models.json (default: the weights folder, $PHOTOENHANCE_WEIGHTS or "
    "~/.cache/photoenhance/weights). Use the same as the server's weights.added.",
)


def _location(location: str | None) -> str:
    return location or WeightsConfig().added_location


@click.group("models")
def models_group() -> None:
    """Models added to the built-in ones (served as bg_model or face_model by name)."""


@models_group.command("add")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Name to serve it by (default: the file's stem).")
@click.option("--replace", is_flag=True, help="Replace an added model of the same name.")
@_DIR
def add_cmd(files: tuple[Path, ...], name: str | None, replace: bool,
            location: str | None) -> None:
    """Recognise FILE's architecture, store it, record its facts and SHA-256.

    FILE: a .pth/.pt/.ckpt/.safetensors state dict, or an ncnn pair MODEL.param MODEL.bin.
    Only tensors are read: TorchScript archives and pickles of other objects are refused.
    """
    from serve_app.engine import added

    try:
        model = added.add(list(files), _location(location), name, replace=replace)
    except (added.Refused, ValueError, FileExistsError) as exc:
        raise click.ClickException(f"refused: {exc}") from None
    field = "face_model" if model.kind == "face" else "bg_model"
    click.echo(f"added {model.name}: {model.arch} x{model.scale} ({model.purpose}, "
               f"{model.params:,} parameters, tiling {model.tiling}); "
               f"serve it with {field}={model.name}")
    dropped = model.source.get("ncnn", {}).get("graph_resize_dropped")
    if dropped:
        click.echo(f"note: the ncnn graph ends with a resize x{dropped}; the network is "
                   "served at its own scale and resized to the requested upscale (Lanczos)")


@models_group.command("list")
@_DIR
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
def list_cmd(location: str | None, as_json: bool) -> None:
    """The added models and their recorded facts."""
    from serve_app.engine import catalog

    for model in catalog.read(_location(location)).values():
        if as_json:
            click.echo(json.dumps(model.public()))
        else:
            click.echo(f"{model.name:24s} {model.kind:4s} {model.arch:14s} x{model.scale} "
                       f"{model.source.get('format', '?'):11s} {model.sha256[:12]}")


@models_group.command("remove")
@click.argument("name")
@_DIR
def remove_cmd(name: str, location: str | None) -> None:
    """Forget an added model (its file is deleted)."""
    from serve_app.engine import catalog

    try:
        catalog.remove(_location(location), name)
    except KeyError:
        raise click.ClickException(f"no added model named {name!r}") from None
    click.echo(f"removed {name}")


COMMANDS = [models_group]
