"""``photoenhance keys create|list``: API keys in a key file (hashes only)."""

from __future__ import annotations

from pathlib import Path

import click

file_option = click.option(
    "--file", "keys_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
    envvar="PHOTOENHANCE_KEYS_FILE", help="The key file (the config's auth.keys_file).",
)


@click.group("keys")
def keys_group() -> None:
    """API keys. Rotate a key: create another for the same NAME, move clients to it, then
    delete the old line from the file (the server re-reads it; no restart)."""


@keys_group.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@file_option
def create_cmd(name: str, role: str, keys_file: Path) -> None:
    """Make a key for NAME, append its hash to the file and print the key once."""
    from serve_app.auth import append_key

    try:
        key, prior = append_key(keys_file, name, role)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)
    note = f" ({prior} older key(s) of {name!r} still valid: remove their lines to revoke)" if prior else ""
    click.echo(f"{role} key for {name!r} added to {keys_file}{note}; it is not shown again.", err=True)


@keys_group.command("list")
@file_option
def list_cmd(keys_file: Path) -> None:
    """Names, roles and hash prefixes in the file (keys themselves are never stored)."""
    from serve_app.auth import parse_lines

    try:
        entries = parse_lines(keys_file.read_text(), str(keys_file))
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for entry in entries:
        click.echo(f"{entry.name}\t{entry.role}\tsha256:{entry.digest.hex()[:12]}...")


COMMANDS = [keys_group]
