"""Enhance a folder or bucket prefix from a Ray job, through the application's handle.

    ray job submit --working-dir . -- python -m serve_app.cli.run \\
        --input s3://bucket/photos/ --output s3://bucket/enhanced/ --state-dir /mnt/state/run1 \\
        --upscale 2 --concurrency 16

The work is ``serve_app.jobs.run_job``; this module is its command line. Run the same command
again and it resumes: recorded items are skipped, the rest are dispatched.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from serve_app.config import APP_NAME
from serve_app.errors import PhotoEnhanceError
from serve_app.jobs import run_job
from serve_app.options import OUTPUT_FORMATS, resolve_options


@click.command()
@click.option("--input", "input_uri", required=True, help="Folder or bucket prefix to enhance.")
@click.option("--output", required=True, help="Output folder or bucket prefix.")
@click.option("--state-dir", default=None, help="Local folder for the manifest (default: output).")
@click.option("--app", "app_name", default=APP_NAME, show_default=True)
@click.option("--address", default="auto", show_default=True, help="Ray address.")
@click.option("--namespace", default="serve", show_default=True)
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--max-attempts", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--preset", default=None)
@click.option("--upscale", type=click.Choice(["1", "2", "4"]), default=None)
@click.option("--face/--no-face", default=None)
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None)
@click.option("--quality", type=int, default=None)
@click.option("-o", "--option", "extra", multiple=True, help="Any option as NAME=VALUE.")
def main(
    input_uri: str, output: str, state_dir: str | None, app_name: str, address: str,
    namespace: str, concurrency: int, max_attempts: int, preset: str | None,
    upscale: str | None, face: bool | None, fmt: str | None, quality: int | None,
    extra: tuple[str, ...],
) -> None:
    """Enhance every image under INPUT into OUTPUT through a running PhotoEnhance app."""
    import ray

    raw: dict[str, Any] = {"preset": preset, "upscale": upscale, "face": face, "format": fmt,
                           "quality": quality}
    for item in extra:
        name, _, value = item.partition("=")
        raw[name.strip()] = value
    try:
        options = resolve_options({k: v for k, v in raw.items() if v is not None})
        ray.init(address=address, namespace=namespace, log_to_driver=False)
        snapshot = asyncio.run(
            run_job(input_uri, output, options, app_name=app_name, concurrency=concurrency,
                    state_dir=state_dir, max_attempts=max_attempts, progress=True)
        )
    except PhotoEnhanceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    counts = snapshot["counts"]
    click.echo(
        f"{snapshot['job_id']}: {snapshot['state']} {counts['succeeded']} succeeded, "
        f"{counts['failed']} failed of {snapshot['total']}"
        + (f" ({snapshot['reason']})" if snapshot.get("reason") else "")
    )
    sys.exit(0 if snapshot["state"] == "completed" else 1)


if __name__ == "__main__":
    main()
