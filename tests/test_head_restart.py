"""The head's GCS restarts: with GCS fault tolerance on a real Redis, the GCS process
(``gcs_server``) is SIGKILLed in the middle of a job and of interactive traffic, left down
for a while, and started again against the same Redis, while the head's raylet and its
workers (proxy, ingress, model replica, job actor, Serve controller) live on.

This is how Ray 2.60 restarts a GCS on one machine: ``ray._private.node.Node`` runs
``gcs_server`` as one of its processes, and ``Node.start_gcs_server()`` starts it again in
the same session on the port the first start persisted (``gcs_server_port``), so raylets
and workers reconnect to the same address; they wait for it up to
``gcs_rpc_server_reconnect_timeout_s`` (60 s by default) before they exit. Ray's own GCS
fault-tolerance tests restart it the same way (``kill_gcs_server`` / ``start_gcs_server``).
The new GCS loads its tables (nodes, actors, jobs, KV) from Redis. docs/SCALING.md ("Failures:
a node dies, the head's GCS restarts") says what a KubeRay head-pod restart adds and what proves it.

A Ray of its own (Redis-backed, in its own temp folder), driven from a subprocess: this file
run as a script (``--driver``) is that driver, so the session's Ray is never touched. Skips
when Debian's ``redis-server`` is missing (``make redis`` installs it where root may).
"""

from __future__ import annotations

import argparse
import contextlib
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

import pytest

ROOT = Path(__file__).resolve().parents[1]
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
ITEMS = 120  # the job running when the GCS is killed
SMALL_ITEMS = 30  # the jobs submitted while it is down, and after it is back
TERMINAL = ("completed", "partial", "failed", "cancelled")
OUTAGE_S = 15.0  # below the raylet's 60 s reconnect timeout, long enough to see serving go on

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(REDIS, os.X_OK),
                       reason="redis-server is missing (Debian: apt-get install redis-server; "
                       "`make redis`)"),
]


@contextlib.contextmanager
def redis_server(port: int, folder: Path) -> Iterator[str]:
    """A throwaway Redis on loopback: no snapshots, no append-only file (the GCS keeps its
    tables in Redis's memory; the Redis of a real cluster is its own durable service)."""
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        import socket

        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def redis_dbsize(port: int) -> int:
    """``DBSIZE`` over Redis's own protocol (no client library needed for one command)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), 5) as conn:
        conn.sendall(b"*1\r\n$6\r\nDBSIZE\r\n")
        reply = conn.recv(64)
    assert reply.startswith(b":"), reply
    return int(reply[1:].split(b"\r\n")[0])


@pytest.mark.timeout(1800)  # one Ray start, a job of 120 items and a GCS restart
def test_serving_and_a_job_go_on_while_the_gcs_restarts(
    serve_args: dict[str, Any], tmp_path: Path
) -> None:
    from conftest import free_port

    args = json.loads(json.dumps(serve_args))
    args["jobs"]["data_dir"] = str(tmp_path / "data")
    args["jobs"].pop("storage", None)  # no object stores in this Ray
    folder = tmp_path / "data" / "inputs" / "gcs"
    folder.mkdir(parents=True)
    spec = tmp_path / "driver.json"
    out = tmp_path / "report.json"
    spec.write_text(json.dumps({"args": args, "port": free_port(), "folder": str(folder),
                                "items": ITEMS, "outage_s": OUTAGE_S, "out": str(out)}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-gcs-"))  # short: Unix socket paths
    redis_port = free_port()
    try:
        with redis_server(redis_port, tmp_path) as address:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_REDIS_ADDRESS": address,
                   "RAY_external_storage_namespace": f"pe-{os.getpid()}-{time.time_ns()}",
                   "RAY_TMPDIR": str(ray_tmp), "RAY_agent_register_timeout_ms": "180000"}
            env.pop("RAY_ADDRESS", None)
            done = subprocess.run(
                [sys.executable, __file__, "--driver", str(spec), "--temp-dir", str(ray_tmp)],
                cwd=ROOT, env=env, timeout=1700, capture_output=True, text=True,
            )
            keys_in_redis = redis_dbsize(redis_port)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
        report = json.loads(out.read_text())
    finally:
        _end_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(json.dumps(report["summary"], indent=1))

    # The GCS kept its tables in this Redis (its command line names it; Redis holds them).
    assert {"--redis_address=127.0.0.1", f"--redis_port={redis_port}"} <= set(
        report["gcs_redis_args"]), report["gcs_redis_args"]
    assert keys_in_redis > 0
    attempts = report["attempts"]
    # Every answer is a 200, or a 503 with Retry-After that a retry turned into a 200; none
    # hung past its deadline and none was a 500.
    assert {a["status"] for a in attempts} <= {200, 503}, report["summary"]
    assert all(a["retry_after"] for a in attempts if a["status"] == 503)
    assert {q["final"] for q in report["requests"]} == {200}
    # Serving went on while there was no GCS: requests sent after the kill and answered
    # before the restart.
    down = [a for a in attempts if a["status"] == 200 and a["t"] > 0
            and a["t"] + a["seconds"] < report["restarted_at"]]
    assert down, report["summary"]
    # The running job went on through the outage (items recorded while there was no GCS); a
    # job submitted while it was down and one submitted after it came back ran too; each
    # ended with every item recorded exactly once.
    assert report["done_at_restart"] > report["done_at_kill"]
    for when, items in (("before", ITEMS), ("during", SMALL_ITEMS), ("after", SMALL_ITEMS)):
        done = report["jobs"][when]
        assert done["state"] == "completed" and done["counts"]["succeeded"] == items, (when, done)
        assert done["indices"] == list(range(items)), f"{when}: an item lost or recorded twice"
    # The new GCS holds the old state (from Redis): the same head node alive, the detached
    # job actor found by name, and it can create actors again.
    assert report["head_node_alive_after"] is True
    assert report["job_actor_found_after"] is True
    assert report["new_actor_after"] == "pong"
    assert report["serve_status_after"] == "RUNNING"


def _end_processes_under(ray_tmp: Path) -> None:
    """What the driver left of its Ray (it shuts Ray down itself; this is for a failure)."""
    sys.path.insert(0, str(ROOT / "cluster"))
    from fake_cluster import stop_own_processes

    stop_own_processes(ray_tmp, grace_s=5)


# ---- the driver: run as ``python tests/test_head_restart.py --driver SPEC`` ---------------


def drive(spec: dict[str, Any], temp_dir: str) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve
    from ray._private import ray_constants

    sys.path.insert(0, str(ROOT / "cluster"))
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _dashboard_agent_port, free_port
    from fake_cluster import Clients, png_bytes

    from serve_app.client import wait_ready
    from serve_app.config import APP_NAME, AppConfig
    from serve_app.deployments.app import build_app
    from serve_app.jobs import NAMESPACE, manager_name

    folder = Path(spec["folder"])
    small = folder.with_name("gcs-small")  # the jobs sent during the outage and after it
    small.mkdir()
    for i in range(spec["items"]):
        (folder / f"g{i:03d}.png").write_bytes(png_bytes(2000 + i))
    for i in range(SMALL_ITEMS):
        (small / f"s{i:03d}.png").write_bytes(png_bytes(3000 + i))
    with _dashboard_agent_port(free_port()):
        ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=False)
    node = ray._private.worker._global_node
    head_id = node.node_id
    report: dict[str, Any] = {"gcs_storage": os.environ["RAY_REDIS_ADDRESS"]}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
        serve.run(build_app(spec["args"]), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{spec['port']}"
        wait_ready(url, 600)
        ingress = spec["args"]["ingress"]
        clients = Clients(url, 2, ingress["queue_timeout_s"] + ingress["request_timeout_s"] + 30)
        clients.start()

        def submit(prefix: Path) -> str:
            r = httpx.post(f"{url}/v1/jobs", timeout=60, json={
                "input_prefix": str(prefix), "max_inflight": 1,
                "options": {"face": False, "upscale": 1}})
            assert r.status_code == 202, r.text
            return str(r.json()["job_id"])

        def job(job_id: str) -> dict[str, Any]:
            return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()

        jobs = {"before": submit(folder)}
        deadline = time.monotonic() + 300
        while job(jobs["before"])["done"] < 5:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)

        [gcs] = node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER]
        report["gcs_pid_before"] = gcs.process.pid
        report["gcs_redis_args"] = [a for a in gcs.process.args if a.startswith("--redis_")
                                    and "password" not in a and "username" not in a]
        report["done_at_kill"] = job(jobs["before"])["done"]
        t_kill = time.time()
        os.kill(gcs.process.pid, signal.SIGKILL)
        gcs.process.wait(30)
        node.kill_gcs_server(check_alive=False)  # forget the dead process and its address
        jobs["during"] = submit(small)  # the ingress and the job actor need no GCS for it
        time.sleep(max(0.0, spec["outage_s"] - (time.time() - t_kill)))
        report["done_at_restart"] = job(jobs["before"])["done"]
        node.start_gcs_server()  # same port (persisted), same session, tables from Redis
        report["restarted_at"] = time.time() - t_kill
        report["gcs_pid_after"] = node.all_processes[
            ray_constants.PROCESS_TYPE_GCS_SERVER][0].process.pid
        jobs["after"] = submit(small)

        report["jobs"] = {}
        for when, job_id in jobs.items():
            deadline = time.monotonic() + 900
            while (snap := job(job_id))["state"] not in TERMINAL:
                assert time.monotonic() < deadline, snap
                time.sleep(0.5)
            manifest = Path(spec["args"]["jobs"]["data_dir"]) / "jobs" / job_id / "manifest.jsonl"
            records = [json.loads(x) for x in manifest.read_text().splitlines()]
            report["jobs"][when] = {
                "state": snap["state"], "counts": snap["counts"],
                "indices": sorted(x["index"] for x in records),
                "retried": sorted(x["index"] for x in records if x.get("attempts", 1) > 1),
            }
        report["jobs_end_s"] = time.time() - t_kill
        time.sleep(3)  # a few requests more after the jobs
        clients.join()
        # What the new GCS knows: read from Redis, not rebuilt.
        report["head_node_alive_after"] = any(
            n["NodeID"] == head_id and n["Alive"] for n in ray.nodes())
        with contextlib.suppress(ValueError):
            ray.get_actor(manager_name(AppConfig.model_validate(spec["args"])), namespace=NAMESPACE)
            report["job_actor_found_after"] = True
        report.setdefault("job_actor_found_after", False)

        @ray.remote(num_cpus=0)
        class Probe:
            def ping(self) -> str:
                return "pong"

        report["new_actor_after"] = ray.get(Probe.remote().ping.remote(), timeout=120)
        report["serve_status_after"] = str(serve.status().applications[APP_NAME].status.value)
        report["attempts"] = [{**a, "t": round(a["t"] - t_kill, 2)} for a in clients.attempts]
        report["requests"] = [{**q, "t": round(q["t"] - t_kill, 2)} for q in clients.requests]
        report["summary"] = summary(report)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    from collections import Counter

    attempts = report["attempts"]
    down = [a for a in attempts if a["t"] > 0 and a["t"] + a["seconds"] < report["restarted_at"]]
    return {
        "outage_s": round(report["restarted_at"], 1),
        "attempts_by_status": dict(Counter(str(a["status"]) for a in attempts)),
        "answered_200_while_gcs_down": sum(1 for a in down if a["status"] == 200),
        "slowest_attempt_s": round(max((a["seconds"] for a in attempts), default=0), 1),
        "job_done_at_kill": report["done_at_kill"],
        "job_done_at_restart": report["done_at_restart"],
        "jobs": {k: {"state": v["state"], "items": len(v["indices"]), "retried": v["retried"]}
                 for k, v in report["jobs"].items()},
        "jobs_end_s_after_kill": round(report["jobs_end_s"], 1),
        "gcs_pid": [report["gcs_pid_before"], report["gcs_pid_after"]],
        "load": os.getloadavg(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--driver", required=True, type=Path)
    parser.add_argument("--temp-dir", required=True)
    opts = parser.parse_args()
    spec = json.loads(opts.driver.read_text())
    result = drive(spec, opts.temp_dir)
    Path(spec["out"]).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result["summary"], indent=1))
