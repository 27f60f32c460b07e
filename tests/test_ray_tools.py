"""Ray's own tools against a running application, as the README tells a user to run them:
`ray job submit` of the job runner module and of a small driver calling the handle, through
Ray's dashboard (its job server), with Ray 2.60's token authentication, and `serve status`.
The README's commands, run for real, in a Ray of this test's own (the session's runs without
the dashboard, which would slow every session's start)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import noise_png
from PIL import Image

from serve_app.client import wait_ready

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent





class OwnRay:
    """A Ray of this test's own, with its dashboard (Ray's job server) on free ports, and the
    dev application deployed into it by `photoenhance serve --address`. Stopped by process
    id: every process whose command line names its temp folder (never `ray stop`)."""

    def __init__(self, serve_args: dict[str, Any], tmp: Path) -> None:

        self.tmp = Path(tempfile.mkdtemp(prefix="ray-tools-"))  # short: socket paths
        self.serve: subprocess.Popen | None = None
        self.log: Any = None
        try:
            self._start(serve_args, tmp)
        except BaseException:
            self.stop()  # nothing of a half-started Ray may outlive the test
            raise

    def _start(self, serve_args: dict[str, Any], tmp: Path) -> None:
        from conftest import DEV_CONFIG, free_port

        gcs, dash, agent, http = free_port(), free_port(), free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.url = f"http://127.0.0.1:{http}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token",
                    "RAY_ADDRESS": self.dashboard, "RAY_DASHBOARD_ADDRESS": self.dashboard,
                    "RAY_agent_register_timeout_ms": "180000"}
        self.env["PATH"] = os.pathsep.join([str(BIN), self.env["PATH"]])
        raw = yaml.safe_load(DEV_CONFIG.read_text())
        args = raw["applications"][0]["args"]
        args["weights"]["dir"] = serve_args["weights"]["dir"]
        args["jobs"]["data_dir"] = str(tmp / "data")
        config = tmp / "dev.yaml"
        config.write_text(yaml.safe_dump(raw))
        # As README's shell: a token for Ray 2.60's auth (kept in ~/.ray/auth_token).
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env,
                       capture_output=True, timeout=120, check=True)
        start_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        for attempt in range(3):
            started = subprocess.run(
                [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=3",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--dashboard-agent-listen-port={agent}", f"--temp-dir={self.tmp}",
                 "--include-dashboard=true", "--disable-usage-stats"],
                env=start_env, capture_output=True, text=True, timeout=300)
            if started.returncode == 0:
                break
            # On a busy machine the raylet can give up on a slow dashboard agent: again.
            self._kill_own()
            assert attempt < 2, started.stdout[-2000:] + started.stderr[-2000:]
        serve_env = {**start_env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        self.log = open(tmp / "serve.log", "wb")  # noqa: SIM115
        self.serve = subprocess.Popen(
            [str(BIN / "photoenhance"), "serve", "--config", str(config), "--port", str(http)],
            cwd=ROOT, env=serve_env, stdout=self.log, stderr=subprocess.STDOUT)
        try:  # a fresh Ray and app on a busy 2-core machine
            wait_ready(self.url, 900, alive=lambda: self.serve.poll() is None, every_s=1)
        except RuntimeError:
            raise AssertionError((tmp / "serve.log").read_text()[-3000:]) from None

    def stop(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.serve.wait(timeout=90)
            if self.serve.poll() is None:
                self.serve.kill()
        if self.log is not None:
            self.log.close()
        self._kill_own()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _kill_own(self) -> None:
        mine = [p for p in psutil.process_iter(["cmdline"])
                if any(str(self.tmp) in part for part in (p.info["cmdline"] or []))]
        for p in mine:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(mine, timeout=30)


@pytest.fixture(scope="module")
def own_ray(serve_args: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    ray = OwnRay(serve_args, tmp_path_factory.mktemp("ray-tools"))
    try:
        yield ray
    finally:
        ray.stop()


def ray_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `ray` command; while the node's job agent has not registered with the
    dashboard yet (seconds after a start on a busy machine), submit again."""
    deadline = time.monotonic() + 180
    while True:
        r = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
        if "No available agent" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(2)


@pytest.mark.timeout(1800)  # its own Ray and application start inside it
def test_ray_job_submit_runs_the_job_module_and_a_handle_driver(
    own_ray: OwnRay, tmp_path: Path
) -> None:
    ray_cli_env = own_ray.env
    source = tmp_path / "in"
    source.mkdir()
    for i in range(6):
        (source / f"p{i}.png").write_bytes(noise_png(700 + i))
    out = tmp_path / "out"
    # This checkout's code in the job (the editable install may point at another one).
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}})

    r = ray_cli(ray_cli_env, "job", "submit", "--runtime-env-json", runtime_env, "--",
                "python", "-m", "serve_app.cli.run", "--input", str(source), "--output",
                str(out), "--no-face", "--upscale", "1", "--concurrency", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout and "completed 6 succeeded, 0 failed of 6" in r.stdout, r.stdout
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(x["index"] for x in records) == list(range(6))
    assert {x["status"] for x in records} == {"succeeded"}
    for x in records:
        assert Image.open(out / x["name"]).size == (24, 24)

    handled = tmp_path / "handled"
    r = ray_cli(ray_cli_env, "job", "submit", "--working-dir", str(ROOT / "examples"),
                "--runtime-env-json", runtime_env, "--",
                "python", "enhance_with_handle.py", str(source), str(handled))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "6 of 6 enhanced" in r.stdout, r.stdout
    assert sorted(p.name for p in handled.iterdir()) == [f"p{i}.png" for i in range(6)]
    assert {Image.open(p).size for p in handled.iterdir()} == {(48, 48)}

    r = subprocess.run([str(BIN / "serve"), "status"], env=ray_cli_env, capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "photoenhance" in r.stdout and "RUNNING" in r.stdout, r.stdout
