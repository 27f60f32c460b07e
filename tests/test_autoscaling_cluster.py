"""Cluster autoscaling on the local fake multi-node cluster (cluster/fake_cluster.py).

The cluster starts its own head (own temp dir and ports) and stops only its own processes,
but it takes the whole machine for minutes, so it is marked ``cluster`` and skipped unless
PHOTOENHANCE_CLUSTER_TESTS=1:

    PHOTOENHANCE_CLUSTER_TESTS=1 .venv/bin/python -m pytest -m cluster tests/test_autoscaling_cluster.py
"""

from __future__ import annotations

import json
import os
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
