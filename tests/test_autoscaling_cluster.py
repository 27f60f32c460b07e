"""Cluster autoscaling and node death on the local fake multi-node cluster
(cluster/fake_cluster.py).

The cluster starts its own head (own temp dir and ports) and stops only its own processes,
but it takes the whole machine for minutes, so it is marked ``cluster`` and skipped unless
PHOTOENHANCE_CLUSTER_TESTS=1:

    PHOTOENHANCE_CLUSTER_TESTS=1 .venv/bin/python -m pytest -m cluster tests/test_autoscaling_cluster.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.environ.get("PHOTOENHANCE_CLUSTER_TESTS") != "1",
        reason="a multi-node fake cluster for minutes; set PHOTOENHANCE_CLUSTER_TESTS=1",
    ),
]


def test_nodes_follow_pending_replicas(tmp_path: Path) -> None:
    out = tmp_path / "fake-cluster"
    cmd = [
        sys.executable, str(ROOT / "cluster" / "fake_cluster.py"), "--yes",
        "--max-workers", "2", "--stages", "15:6,60:6,5:0", "--user-rate", "2",
        "--idle-timeout-min", "0.5", "--tail-margin-s", "150", "--out", str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())

    ups = [e for e in report["resource_node_events"] if e["kind"] == "up"]
    downs = [e for e in report["resource_node_events"] if e["kind"] == "down"]
    assert ups, "no fake_gpu node was added under load"
    assert downs and downs[-1]["to"] == 1, "idle fake_gpu nodes were not removed"
    assert max(s.get("running", 0) for s in report["samples"]) >= 2
    assert set(report["errors_by_status"]) <= {"503"}
    assert out.with_suffix(".png").stat().st_size > 1000


def _scenario(flag: str, out: Path) -> dict:
    """Run a fake_cluster.py failure scenario (80 items, 2 clients) and read its report."""
    from conftest import free_port

    cmd = [sys.executable, str(ROOT / "cluster" / "fake_cluster.py"), flag,
           "--items", "80", "--clients", "2", "--idle-timeout-min", "5", "--out", str(out),
           "--port", str(free_port())]
    done = subprocess.run(cmd, cwd=ROOT, timeout=1200, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stdout)  # the figures docs/SCALING.md quotes
    return json.loads(out.with_suffix(".json").read_text())


def test_a_node_dies_mid_job_and_mid_traffic(tmp_path: Path) -> None:
    """SIGKILL the fake node that holds the model replica (its raylet, workers and agents)
    while a job of 80 items runs and two clients send requests (cluster/fake_cluster.py
    --node-death): no request fails for good, hangs or answers 500, the job records every
    item exactly once, and Serve and the autoscaler put a replica and a node back."""
    report = _scenario("--node-death", tmp_path / "node-death")

    assert "timed_out" not in report, report["events_s"]
    assert report["kill"]["names"].count("raylet") == 1
    assert any("Enhancer" in name for name in report["kill"]["names"])
    victim = report["placement"]["model_replica_node"]
    assert victim not in report["placement"]["ingress_node"]
    # Every attempt answered in time with 200, or 503 + Retry-After; every request ended 200.
    attempts = report["attempts"]
    assert {a["status"] for a in attempts} <= {200, 503}
    assert all(a["retry_after"] for a in attempts if a["status"] == 503)
    assert {q["final"] for q in report["requests"]} == {200}
    assert [q for q in report["requests"] if q["t"] > 0], "no request was sent after the kill"
    # The job: completed, each of the 80 items recorded once, none failed.
    assert report["job"]["state"] == "completed"
    assert report["job"]["counts"]["succeeded"] == 80
    assert report["manifest"]["indices"] == list(range(80))
    # The killed node is dead to the GCS, a new fake_gpu node is alive, and the model
    # replica runs again elsewhere.
    assert report["gcs_nodes_after"][victim]["alive"] is False
    assert [n for i, n in report["gcs_nodes_after"].items()
            if i != victim and n["alive"] and n["resources"].get("fake_gpu")]
    assert {"node_dead_in_gcs", "new_node_alive", "new_replica_alive",
            "first_200_after_kill"} <= set(report["events_s"])


@pytest.mark.skipif(not (shutil.which("redis-server") or os.access("/usr/bin/redis-server", os.X_OK)),
                    reason="redis-server is missing (`make redis`)")
def test_the_whole_head_restarts_with_gcs_fault_tolerance(tmp_path: Path) -> None:
    """GCS fault tolerance on a loopback Redis; the whole head (GCS, raylet, proxy, ingress,
    Serve controller, job actor, autoscaler) SIGKILLed mid-job and mid-traffic and started
    again as a new head pod would (cluster/fake_cluster.py --head-restart): the model
    replica on the worker node lives through it, serving resumes, the job loses nothing."""
    report = _scenario("--head-restart", tmp_path / "head-restart")

    assert "timed_out" not in report
    assert {"gcs_server", "raylet", "ray::ServeController", "ray::ProxyActor"} <= set(report["killed"])
    # While the head (the only proxy) was down, connections were refused and retried; every
    # answer was a 200 or a 503 with Retry-After, and every request ended 200.
    attempts = report["attempts"]
    assert {a["status"] for a in attempts} <= {200, 503, "transport:ConnectError"}
    assert all(a["retry_after"] for a in attempts if a["status"] == 503)
    assert {q["final"] for q in report["requests"]} == {200}
    assert report["first_200_after_kill_s"] is not None
    # The GCS came back with its tables from Redis: the worker node and its model replica
    # (the same actor) lived through it, and Serve runs again.
    assert report["worker_node_alive"] is True
    assert report["model_replica_kept"] is True
    assert report["serve_after"]["status"] == "RUNNING"
    # The job: completed, each of the 80 items recorded once.
    assert report["job"]["state"] == "completed"
    assert report["manifest"]["indices"] == list(range(80))
