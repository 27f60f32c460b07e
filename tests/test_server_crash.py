"""A whole-server crash that also takes Ray down: `photoenhance serve` and every process of
its Ray are SIGKILLed in the middle of a job, then the same command starts again and the job
resumes from its manifest: no item lost, none recorded twice.

Its own `photoenhance serve` (its own Ray, in its own temp folder), not the session's: the
point is to lose Ray's state too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from serve_app.client import wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 40


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Server:
    """`photoenhance serve` in a subprocess; ``crash()`` SIGKILLs it and all its descendants."""

    def __init__(self, config: Path, port: int, ray_tmp: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
        env.pop("RAY_ADDRESS", None)
        self.log = open(ray_tmp / f"serve-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "photoenhance"), "serve", "--config", str(config),
             "--port", str(port), "--no-dashboard"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 420) -> None:
        wait_ready(self.url, timeout, alive=lambda: self.proc.poll() is None)

    def crash(self) -> None:
        family = [psutil.Process(self.proc.pid)]
        family += family[0].children(recursive=True)
        for p in family:  # the driver, Ray's daemons and workers: everything, at once
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.crash()
        self.log.close()


@pytest.fixture
def crash_setup(serve_args: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Path, int, Path]]:
    from conftest import DEV_CONFIG, free_port

    raw = yaml.safe_load(DEV_CONFIG.read_text())
    args = raw["applications"][0]["args"]
    args["weights"]["dir"] = serve_args["weights"]["dir"]  # the session's, when made already
    args["jobs"]["data_dir"] = str(tmp_path / "data")
    args["name"] = "photoenhance"
    config = tmp_path / "crash.yaml"
    config.write_text(yaml.safe_dump(raw))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-crash-"))  # short: Unix socket paths
    try:
        yield config, free_port(), ray_tmp
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(2400)  # two starts of a Ray and the application inside it
def test_a_job_resumes_after_the_server_and_ray_are_killed(crash_setup) -> None:
    config, port, ray_tmp = crash_setup
    data_dir = Path(yaml.safe_load(config.read_text())["applications"][0]["args"]["jobs"]["data_dir"])
    folder = data_dir / "inputs" / "crash"
    folder.mkdir(parents=True)
    for i in range(ITEMS):
        (folder / f"c{i:03d}.png").write_bytes(png(i))

    first = Server(config, port, ray_tmp)
    try:
        first.wait_ready()
        r = httpx.post(f"{first.url}/v1/jobs", timeout=60, json={
            "input_prefix": str(folder), "max_inflight": 1,
            "options": {"face": False, "upscale": 1}})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 300
        while httpx.get(f"{first.url}/v1/jobs/{job_id}", timeout=60).json()["done"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        first.crash()
    manifest = data_dir / "jobs" / job_id / "manifest.jsonl"
    recorded = len(manifest.read_text().splitlines())
    assert 5 <= recorded < ITEMS, recorded

    second = Server(config, port, ray_tmp)
    try:
        second.wait_ready()
        deadline = time.monotonic() + 600
        while True:
            snap = httpx.get(f"{second.url}/v1/jobs/{job_id}", timeout=60).json()
            if snap["state"] in ("completed", "partial", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, snap
            time.sleep(0.5)
        assert snap["state"] == "completed" and snap["counts"]["succeeded"] == ITEMS
        records = [json.loads(x) for x in manifest.read_text().splitlines()]
        indices = sorted(x["index"] for x in records)
        assert indices == list(range(ITEMS)), "an item was lost or recorded twice"
        outputs = list((data_dir / "jobs" / job_id / "outputs").iterdir())
        assert len(outputs) == ITEMS and not [p for p in outputs if p.name.endswith(".tmp")]
    finally:
        second.stop()
