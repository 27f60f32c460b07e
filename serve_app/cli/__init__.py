"""The ``photoenhance`` command. Each sub-module adds its commands to ``main``."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """PhotoEnhance Serve: GFPGAN face restoration and Real-ESRGAN upscaling on Ray Serve."""


def _register() -> None:
    # Imported here so that `photoenhance --help` stays cheap and each module owns its commands.
    from serve_app.cli import bench, enhance, jobs, keys, models, serve, weights

    for module in (serve, enhance, weights, bench, jobs, models, keys):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
