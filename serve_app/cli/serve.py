"""``photoenhance serve``: start (or join) Ray, deploy the application, block until a signal."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import click

LOGGER = logging.getLogger(__name__)


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on by this server alone; None when it can."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"the host does not resolve: {exc.strerror}"
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not busy
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


@click.command("serve")
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=Path("configs/local.yaml"), show_default=True, help="A Ray Serve config file.",
)
@click.option("--host", default=None, help="HTTP host (default: the config's http_options).")
@click.option("--port", type=int, default=None, help="HTTP port (default: the config's).")
@click.option(
    "--address", default=None,
    help="Ray cluster to join (default: $RAY_ADDRESS; unset: start a local Ray).",
)
@click.option(
    "--dashboard/--no-dashboard", default=True, show_default=True,
    help="Start Ray's dashboard with a local Ray (for `ray job submit`, `serve status` and the "
    "dashboard's Serve view).",
)
def serve_cmd(
    config_path: Path, host: str | None, port: int | None, address: str | None, dashboard: bool
) -> None:
    """Deploy the application from CONFIG and serve until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    from serve_app.cli.serve_file import load_serve_file
    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app, resolve_paths

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve_file = load_serve_file(config_path)
    name = serve_file.raw["applications"][0].get("name", APP_NAME)
    http_options = dict(serve_file.raw.get("http_options") or {})
    http_options["host"] = host or serve_file.http_host
    http_options["port"] = port or serve_file.http_port
    config = resolve_paths(serve_file.app)  # relative folders: against this directory

    address = address or os.environ.get("RAY_ADDRESS") or None
    joined = address is not None
    if not joined:
        prepare_local_ray(str(http_options["host"]), int(http_options["port"]))
    context = ray.init(
        address=address or "local", include_dashboard=dashboard if not joined else None
    )
    stop = stop_on_signals()
    try:
        start_kwargs: dict[str, Any] = {"http_options": http_options}
        if serve_file.raw.get("proxy_location"):
            start_kwargs["proxy_location"] = serve_file.raw["proxy_location"]
        serve.start(**start_kwargs)
        serve.run(build_app(config), name=name, route_prefix=serve_file.route_prefix)
        dashboard_url = None if joined else context.dashboard_url
        announce(str(http_options["host"]), int(http_options["port"]), config_path,
                 config.auth.enabled, f"http://{dashboard_url}" if dashboard_url else None)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            if joined:
                serve.delete(name)  # leave the shared cluster's Serve to its owners
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
        click.echo("stopped.")


def prepare_local_ray(host: str, port: int) -> None:
    """Before starting a local Ray: refuse a busy port, and put this interpreter first on
    the PATH that Ray's processes inherit."""
    # Ray's proxy listens with SO_REUSEPORT: a second server on a busy port would start
    # and silently take half of the first one's requests.
    busy = port_taken(host, port)
    if busy:
        raise click.ClickException(
            f"{host}:{port} is already in use ({busy}); stop the server there or choose "
            "another --port"
        )
    # A Ray job's `python` entrypoint is then this interpreter, with the project's
    # packages, not the system's.
    venv_bin = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([venv_bin, os.environ.get("PATH", "")])


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        LOGGER.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def announce(host: str, port: int, config_path: Path, auth: bool, dashboard: str | None) -> None:
    """Where the server is, a first request, Ray's tools (a local Ray's dashboard), keys."""
    url = f"http://{host}:{port}"
    click.echo(f"PhotoEnhance is serving at {url} (config {config_path}); Ctrl-C stops it.")
    header = "-H 'Authorization: Bearer $PHOTOENHANCE_API_KEY' " if auth else ""
    click.echo(f"  curl -sS --data-binary @photo.jpg -H 'Content-Type: image/jpeg' {header}"
               f"'{url}/v1/enhance?upscale=2' -o out.jpg")
    if dashboard:
        click.echo(ray_tools_help(dashboard))
    announce_keys(auth, host)


def ray_tools_help(dashboard: str) -> str:
    """How to reach this Ray with its own tools (Ray 2.60 turns token auth on for a new local
    Ray; its CLI sends the token from ~/.ray/auth_token only when RAY_AUTH_MODE=token)."""
    token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    env = f"RAY_ADDRESS={dashboard} RAY_DASHBOARD_ADDRESS={dashboard}"
    if token:
        env += " RAY_AUTH_MODE=token"
    lines = [
        f"Ray dashboard: {dashboard}  (Serve view: {dashboard}/#/serve"
        + (", token: `ray get-auth-token`)" if token else ")"),
        "  In another shell:",
        f"  export {env}",
        "  serve status",
        "  ray job submit -- python -m serve_app.cli.run --input IN_DIR --output OUT_DIR",
    ]
    return "\n".join(lines)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def announce_keys(enabled: bool, host: str) -> None:
    """Say at start whether API keys are required; shout when nobody needs one to reach a
    server on a network address."""
    if enabled:
        click.echo("API keys: ON (Authorization: Bearer <key>; see docs/SECURITY.md).")
    elif is_loopback(host):
        click.echo(f"API keys: off (only this machine can reach {host}; see docs/SECURITY.md).")
    else:
        banner = "!" * 78
        message = (
            f"{banner}\nWARNING: serving on {host} with API keys OFF: anyone who can reach "
            "this address\ncan submit jobs, read every job's results and use the GPUs. Turn "
            "keys on\n(auth.enabled, docs/SECURITY.md) or bind to 127.0.0.1.\n" + banner
        )
        LOGGER.warning("API keys are off on non-loopback address %s", host)
        click.secho(message, fg="red", bold=True, err=True)


COMMANDS = [serve_cmd]
