"""``photoenhance keys create|list|webhook-secret``: API keys in a key file (hashes only),
and the secret that signs each key's job callbacks."""

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


@keys_group.command("webhook-secret")
@click.argument("name")
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=Path("configs/local.yaml"), show_default=True,
    help="The server's config (its jobs.webhook_secret; else $PHOTOENHANCE_WEBHOOK_SECRET).",
)
def webhook_secret_cmd(name: str, config_path: Path) -> None:
    """Print (hex) the secret that signs the callbacks of NAME's jobs, for NAME's holder: a
    receiver verifies with ``bytes.fromhex(secret)`` (docs/JOBS.md). Derived from the server's
    secret, so it needs no storing; a new server secret changes every key's."""
    from serve_app.auth import NAME_RE
    from serve_app.cli.serve_file import load_serve_file
    from serve_app.errors import PhotoEnhanceError
    from serve_app.jobs import webhook_secret_for

    if not NAME_RE.match(name):
        raise click.ClickException(f"{name!r} is not a key name")
    config = load_serve_file(config_path).app
    try:
        secret = webhook_secret_for(config.jobs, name)
    except PhotoEnhanceError as exc:
        raise click.ClickException(f"{exc.message}: set jobs.webhook_secret or "
                                   "PHOTOENHANCE_WEBHOOK_SECRET") from None
    click.echo(secret.hex())


COMMANDS = [keys_group]
