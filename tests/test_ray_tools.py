"""Ray's own tools against the running application, as the README tells a user to run them:
`ray job submit` of the job runner module and of a small driver calling the handle, through
the session Ray's dashboard (its job server), with Ray 2.60's token authentication, and
`serve status`. The README's commands, run for real."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ray_cli_env(serve_url: str) -> dict[str, str]:
    """The environment the README gives a second shell: the dashboard's address, and token
    mode when the local Ray turned token authentication on (Ray 2.60 does by default)."""
    import ray

    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    env = {**os.environ, "RAY_ADDRESS": dashboard, "RAY_DASHBOARD_ADDRESS": dashboard}
    env["PATH"] = os.pathsep.join([str(BIN), env["PATH"]])
    if os.environ.get("RAY_AUTH_MODE") == "token":
        env["RAY_AUTH_MODE"] = "token"
    return env


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


def test_ray_job_submit_runs_the_job_module_and_a_handle_driver(
    ray_cli_env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for i in range(6):
        (source / f"p{i}.png").write_bytes(png(700 + i))
    out = tmp_path / "out"
    # This checkout's code in the job (the editable install may point at another one).
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}})

    r = ray_cli(ray_cli_env, "job", "submit", "--runtime-env-json", runtime_env, "--",
                "python", "-m", "serve_app.jobs.run", "--input", str(source), "--output",
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
