"""``photoenhance enhance FILE_OR_FOLDER... --out DIR``: send files to a running server,
concurrently. Which files and where results go: ``serve_app.cli.files``. Every option of
``EnhanceOptions`` is a flag, generated from its field (so a new option is a new flag)."""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePath
from typing import Any

import click

from serve_app.cli.files import FORMAT_EXTENSIONS, Plan, output_path, plan
from serve_app.options import EnhanceOptions


def _choices(annotation: Any) -> list[str] | None:
    """The values of a ``Literal`` (or ``Literal | None``); None for anything else (an
    added model's name is any string, so ``face_model`` stays free text)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in args]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _choices(rest[0])
    return None


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def enhance_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per ``EnhanceOptions`` field, unset by default (the server's
    defaults and presets apply): ``--face/--no-face`` for booleans, a choice for literals."""
    for name, info in reversed(EnhanceOptions.model_fields.items()):
        flag, help_text = option_flag(name), info.description or ""
        if info.annotation is bool:
            default = "on" if info.default else "off"
            decorator = click.option(f"{flag}/--no-{flag[2:]}", name, default=None,
                                     help=f"{help_text} (default: {default})".strip())
        elif (choices := _choices(info.annotation)) is not None:
            decorator = click.option(flag, name, type=click.Choice(choices), default=None,
                                     help=help_text or None)
        else:
            kind = typing.get_args(info.annotation) or (info.annotation,)
            ptype = float if float in kind else int if int in kind else str
            decorator = click.option(flag, name, type=ptype, default=None, help=help_text or None)
        command = decorator(command)
    return command


@click.command("enhance")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the results (created if missing); folders are mirrored in it.")
@click.option("--server", default="http://127.0.0.1:8000", show_default=True,
              envvar="PHOTOENHANCE_SERVER", help="Base URL of a running server.")
@enhance_options
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Walk folders into their subfolders (symlinked folders are not followed).")
@click.option("-j", "--concurrency", type=int, default=4, show_default=True)
@click.option("--retries", type=int, default=5, show_default=True, help="Retries on 503.")
@click.option("--overwrite/--skip-existing", default=True, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Name every file skipped, and why.")
def enhance_cmd(
    files: tuple[Path, ...], out_dir: Path, server: str, recursive: bool, concurrency: int,
    retries: int, overwrite: bool, verbose: bool, **options: Any,
) -> None:
    """Enhance FILES (or the images in folders, recursively) through the server at --server."""
    from tqdm import tqdm

    from serve_app.client import ApiError, Client

    fmt: str | None = options.get("format")
    options = {k: (int(v) if k == "upscale" else v) for k, v in options.items() if v is not None}
    found = plan(files, recursive=recursive, exclude=out_dir)
    taken = {str(rel).casefold() for _, rel in found.inputs}
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    skipped: list[Path] = []
    synthetic = False

    def one(path: Path, rel: PurePath) -> str:
        nonlocal synthetic
        # Every name rel's output may have, one per format; with --format only that one
        # counts as done, as the server chooses the format otherwise.
        existing = {f: out_dir / output_path(rel, f, taken) for f in FORMAT_EXTENSIONS}
        existing = {f: p for f, p in existing.items() if p.is_file()}
        done = [p for f, p in existing.items() if fmt in (None, f)]
        if done and not overwrite:
            skipped.append(path)
            return f"skipped (exists: {done[0].name})"
        result = client.enhance(path.read_bytes(), filename=path.name, **options)
        synthetic = synthetic or result.synthetic
        target = out_dir / output_path(rel, result.format, taken)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_bytes(result.data)
        tmp.replace(target)
        for old in existing.values():  # written in another format: one output per input
            if old != target:
                old.unlink(missing_ok=True)
        return f"{target.name} {result.width}x{result.height}, {result.faces} faces"

    with Client(server, retries=retries) as client, ThreadPoolExecutor(
        max_workers=max(1, concurrency)
    ) as pool, tqdm(total=len(found.inputs), unit="img", desc="enhance") as bar:
        futures = {pool.submit(one, p, rel): p for p, rel in found.inputs}
        for future in as_completed(futures):
            path = futures[future]
            try:
                bar.set_postfix_str(f"{path.name}: {future.result()}"[:60])
            except ApiError as exc:
                failures.append((path, f"{exc.status} {exc.code}: {exc.message}"))
            except Exception as exc:  # network errors, unreadable files
                failures.append((path, f"{type(exc).__name__}: {exc}"))
            bar.update()
    _report(found, out_dir, failures, skipped, synthetic, verbose)
    if failures:
        sys.exit(1)


def _report(found: Plan, out_dir: Path, failures: list[tuple[Path, str]], skipped: list[Path],
            synthetic: bool, verbose: bool) -> None:
    for path, why in failures:
        click.echo(f"FAILED {path}: {why}", err=True)
    if verbose:
        for path in found.not_images:
            click.echo(f"skipped (not an image): {path}", err=True)
        for path in found.links:
            click.echo(f"skipped (symlinked folder, not followed): {path}", err=True)
        for path in skipped:
            click.echo(f"skipped (output exists): {path}", err=True)
    if synthetic:
        click.echo("WARNING: the server runs SYNTHETIC weights; outputs are not real "
                   "restorations.", err=True)
    total = len(found.inputs)
    written = total - len(failures) - len(skipped)
    click.echo(
        f"{written} of {total} written into {out_dir}"
        + (f", {len(skipped)} skipped (output exists)" if skipped else "")
        + (f", {len(found.not_images)} skipped (not images)" if found.not_images else "")
        + (f", {len(found.links)} symlinked folders not followed" if found.links else "")
        + (f", {len(failures)} failed" if failures else "")
    )

COMMANDS = [enhance_cmd]
