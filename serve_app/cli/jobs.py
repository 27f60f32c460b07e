"""``photoenhance job submit|status|watch|cancel|pause|resume|download``: jobs over HTTP."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from serve_app.cli.files import plan
from serve_app.options import OUTPUT_FORMATS

TERMINAL = {"completed", "partial", "failed", "cancelled"}

server_option = click.option(
    "--server", default="http://127.0.0.1:8000", show_default=True,
    envvar="PHOTOENHANCE_SERVER", help="Base URL of a running server.",
)


def _client(server: str) -> Any:
    import httpx

    from serve_app.client import auth_headers

    return httpx.Client(base_url=server, timeout=httpx.Timeout(60.0, read=None),
                        headers=auth_headers())


def _check(response: Any) -> Any:
    if response.status_code < 400:
        return response.json() if "json" in response.headers.get("content-type", "") else None
    try:
        err = response.json()["error"]
        text = f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        text = response.text[:300]
    click.echo(f"error ({response.status_code}) {text}", err=True)
    sys.exit(1)


def _summary(job: dict[str, Any]) -> str:
    c = job["counts"]
    eta = f", ETA {job['eta_s']:.0f}s" if job.get("eta_s") is not None else ""
    reason = f" ({job['reason']})" if job.get("reason") else ""
    return (f"{job['job_id']}  {job['state']}{reason}  {job['done']}/{job['total']} done, "
            f"{c['failed']} failed{eta}")


@click.group("job")
def job_group() -> None:
    """Batch jobs: submit many images, follow progress, download results."""


@job_group.command("submit")
@click.argument("files", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--input", "inputs", multiple=True, help="An input URI (repeatable).")
@click.option("--input-prefix", default=None, help="A server-side folder or bucket prefix.")
@click.option("--output", default=None, help="Output storage URI (default: the server's).")
@click.option("--priority", type=int, default=None, help="Higher runs first.")
@click.option("--max-inflight", type=int, default=None, help="Items in flight for this job.")
@click.option("-o", "--option", "extra", multiple=True, help="An option as NAME=VALUE.")
@click.option("--preset", default=None)
@click.option("--upscale", type=click.Choice(["1", "2", "4"]), default=None)
@click.option("--face/--no-face", default=None)
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None)
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Walk folders into their subfolders (symlinked folders are not followed).")
@click.option("--watch", "follow", is_flag=True, help="Follow progress until the job ends.")
@server_option
def submit_cmd(
    files: tuple[Path, ...], inputs: tuple[str, ...], input_prefix: str | None,
    output: str | None, priority: int | None, max_inflight: int | None,
    extra: tuple[str, ...], preset: str | None, upscale: str | None, face: bool | None,
    fmt: str | None, recursive: bool, follow: bool, server: str,
) -> None:
    """Upload FILES (or the images in folders, recursively), or name server-side --input or
    --input-prefix. Each upload is named by its path inside its folder argument, as the web
    page names a dropped folder's files: the job's outputs keep the tree, and two
    ``IMG_0001.jpg`` in different subfolders stay two (``photoenhance enhance`` picks and
    names files the same way)."""
    options: dict[str, Any] = {"preset": preset, "upscale": upscale, "face": face, "format": fmt}
    for item in extra:
        name, _, value = item.partition("=")
        options[name.strip()] = value
    options = {k: v for k, v in options.items() if v is not None}
    job_fields = {"output": output, "priority": priority, "max_inflight": max_inflight}
    job_fields = {k: v for k, v in job_fields.items() if v is not None}
    if sum(bool(x) for x in (files, inputs, input_prefix)) != 1:
        raise click.UsageError("give FILES, or --input URIs, or --input-prefix (one kind)")
    with _client(server) as client:
        if files:
            found = plan(files, recursive=recursive)
            if not found.inputs:
                raise click.UsageError("no image files in FILES")
            with contextlib.ExitStack() as stack:
                # httpx streams open files part by part; nothing is read whole.
                parts = [("files", (rel.as_posix(), stack.enter_context(open(p, "rb"))))
                         for p, rel in found.inputs]
                data = {**{k: str(v).lower() if isinstance(v, bool) else str(v)
                           for k, v in options.items()},
                        **{k: str(v) for k, v in job_fields.items()}}
                job = _check(client.post("/v1/jobs", files=parts, data=data))
        else:
            body: dict[str, Any] = {"options": options, **job_fields}
            if inputs:
                body["inputs"] = list(inputs)
            else:
                body["input_prefix"] = input_prefix
            job = _check(client.post("/v1/jobs", json=body))
        click.echo(job["job_id"])
        if follow:
            sys.exit(_watch(client, job["job_id"]))


@job_group.command("status")
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@server_option
def status_cmd(job_id: str | None, as_json: bool, server: str) -> None:
    """One job's state, or every job's."""
    with _client(server) as client:
        if job_id:
            jobs = [_check(client.get(f"/v1/jobs/{job_id}"))]
        else:
            jobs = _check(client.get("/v1/jobs"))["jobs"]
    for job in jobs:
        click.echo(json.dumps(job) if as_json else _summary(job))


def _events(client: Any, job_id: str) -> Iterator[dict[str, Any]]:
    """Snapshots from the job's event stream until it ends; a stream that ends as ``idle``
    (nothing changed for a while, e.g. paused) or drops is opened again."""
    while True:
        ending = None
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "end":
                        ending = data.get("reason")
                    else:
                        yield data
                elif not line:
                    event = "message"
        if ending not in (None, "idle"):
            return


def _watch(client: Any, job_id: str) -> int:
    from tqdm import tqdm

    bar = tqdm(unit="img", desc=job_id, dynamic_ncols=True)
    last: dict[str, Any] = {}
    try:
        for last in _events(client, job_id):
            bar.total = last["total"]
            bar.n = last["done"]
            bar.set_postfix_str(f"{last['state']}, {last['counts']['failed']} failed", refresh=False)
            bar.refresh()
    finally:
        bar.close()
    if last:
        click.echo(_summary(last))
    return 0 if last.get("state") == "completed" else 1


@job_group.command("watch")
@click.argument("job_id")
@server_option
def watch_cmd(job_id: str, server: str) -> None:
    """A live progress bar (server-sent events) until the job ends."""
    with _client(server) as client:
        sys.exit(_watch(client, job_id))


def _control(action: str) -> click.Command:
    @click.command(action, help=f"{action.capitalize()} a job.")
    @click.argument("job_id")
    @server_option
    def command(job_id: str, server: str) -> None:
        with _client(server) as client:
            click.echo(_summary(_check(client.post(f"/v1/jobs/{job_id}/{action}"))))

    return command


@job_group.command("download")
@click.argument("job_id")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="ZIP file to write (default: JOB_ID.zip).")
@click.option("--manifest", is_flag=True, help="Download manifest.jsonl instead.")
@server_option
def download_cmd(job_id: str, out: Path | None, manifest: bool, server: str) -> None:
    """Stream the succeeded outputs as a ZIP (or the manifest) to a file."""
    path = f"/v1/jobs/{job_id}/" + ("manifest.jsonl" if manifest else "results.zip")
    out = out or Path(f"{job_id}." + ("jsonl" if manifest else "zip"))
    tmp = out.with_name(out.name + ".part")
    with _client(server) as client, client.stream("GET", path) as response:
        if response.status_code >= 400:
            response.read()
            _check(response)
        with open(tmp, "wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
    tmp.replace(out)
    click.echo(f"{out} ({out.stat().st_size} bytes)")


for _action in ("cancel", "pause", "resume"):
    job_group.add_command(_control(_action))

COMMANDS: list[click.Command] = [job_group]
