"""Cluster autoscaling on one machine: a fake multi-node Ray cluster whose worker type
carries a GPU-like resource, the app deployed with its model replicas needing it, and a
load scenario that makes Serve ask for replicas and the Ray autoscaler add and remove nodes.

    .venv/bin/python cluster/fake_cluster.py --yes --out docs/loadtest-fake-cluster

WARNING: Ray's AutoscalingCluster runs ``ray stop --force`` when it starts and when it stops,
which ends EVERY Ray process on this machine (other test runs, other people's servers).
The script refuses to run without ``--yes``. Run it alone.

The head has CPUs only (the ingress, the controller and the job actor live there); each
``gpu_sim`` worker node has 1 CPU and 1 ``fake_gpu``, and each model replica needs one
``fake_gpu``, so every replica beyond the nodes present is a pending one, which is what makes
the autoscaler launch a node. Idle nodes go after ``--idle-timeout-min``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = Path(__file__).with_name("fake_multinode.yaml")
DEV_CONFIG = ROOT / "configs" / "dev.yaml"
WORKER_TYPE = "gpu_sim"
RESOURCE = "fake_gpu"
HEAD_CPUS = 2

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))


def cluster_class() -> type:
    from ray.cluster_utils import AutoscalingCluster

    class FakeGpuCluster(AutoscalingCluster):
        """AutoscalingCluster whose base config is ``cluster/fake_multinode.yaml``."""

        def _generate_config(
            self,
            head_resources: dict[str, Any],
            worker_node_types: dict[str, Any],
            autoscaler_v2: bool = False,
            **config_kwargs: Any,
        ) -> dict[str, Any]:
            return generate_config(head_resources, worker_node_types, **config_kwargs)

    return FakeGpuCluster


def generate_config(
    head_resources: dict[str, Any], worker_node_types: dict[str, Any], **config_kwargs: Any
) -> dict[str, Any]:
    """What AutoscalingCluster builds from Ray's example.yaml, built from ours."""
    config = copy.deepcopy(yaml.safe_load(BASE_CONFIG.read_text()))
    config["available_node_types"] = copy.deepcopy(worker_node_types)
    config["available_node_types"]["ray.head.default"] = {
        "resources": dict(head_resources),
        "node_config": {},
        "max_workers": 0,
    }
    config.update(config_kwargs)
    return config


def worker_node_types(max_workers: int) -> dict[str, Any]:
    return {
        WORKER_TYPE: {
            "resources": {"CPU": 1, RESOURCE: 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": max_workers,
        }
    }


def app_args(max_replicas: int, data: Path, min_replicas: int = 1) -> dict[str, Any]:
    """configs/dev.yaml's app, its model replicas pinned to ``fake_gpu`` nodes and scaling
    fast enough to watch."""
    args = copy.deepcopy(yaml.safe_load(DEV_CONFIG.read_text())["applications"][0]["args"])
    args["weights"] = {**args.get("weights", {}), "dir": str(data / "weights")}
    args["jobs"] = {**args.get("jobs", {}), "data_dir": str(data / "jobs")}
    model = args.setdefault("model", {})
    model.update({"num_cpus": 1, "num_gpus": 0, "resources": {RESOURCE: 1}})
    model["autoscaling"] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": min_replicas,
        "allow_scale_to_zero": min_replicas == 0,
        "target_queue_depth": 2,
        "upscale_delay_s": 5,
        "downscale_delay_s": 20,
        "metrics_interval_s": 1,
        "look_back_period_s": 5,
    }
    return args


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f}s")


def run(opts: argparse.Namespace) -> dict[str, Any]:
    import ray
    import run_scenario
    from ray import serve

    from serve_app.deployments.app import APP_NAME, build_app

    data = Path(tempfile.mkdtemp(prefix="pe-fake-cluster-"))
    cluster = cluster_class()(
        head_resources={"CPU": HEAD_CPUS},
        worker_node_types=worker_node_types(opts.max_workers),
        max_workers=opts.max_workers,
        idle_timeout_minutes=opts.idle_timeout_min,
    )
    cluster.start()
    try:
        ray.init(
            address="auto",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
        # One proxy, on the head: a proxy actor on a worker keeps that node from going idle.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": opts.port})
        serve.run(build_app(app_args(opts.max_workers, data, opts.min_replicas)),
                  name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{opts.port}"
        wait_ready(url, opts.ready_timeout_s)
        min_nodes = opts.min_replicas

        def settled(samples: list[dict[str, Any]]) -> bool:
            last = samples[-1] if samples else {}
            return last.get("running") == opts.min_replicas and last.get("resource_nodes") == min_nodes

        scenario = run_scenario.Scenario(
            base_url=url,
            locustfile=opts.locustfile,
            stages=opts.stages,
            user_rate=opts.user_rate,
            app=APP_NAME,
            deployment="Enhancer",
            ray_address="auto",
            node_resource=RESOURCE,
            sample_every_s=2,
            tail_s=opts.idle_timeout_min * 60 + 20 + opts.tail_margin_s,
            out=opts.out,
        )
        report = run_scenario.run(scenario, settle=settled)
        report["cluster"] = {
            "head_cpus": HEAD_CPUS,
            "worker_type": worker_node_types(opts.max_workers),
            "idle_timeout_minutes": opts.idle_timeout_min,
            "app_model": app_args(opts.max_workers, data, opts.min_replicas)["model"],
        }
        Path(opts.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        return report
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--yes", action="store_true", help="I know this stops every Ray process here")
    p.add_argument("--max-workers", type=int, default=2)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--idle-timeout-min", type=float, default=0.5)
    p.add_argument("--locustfile", default="interactive")
    p.add_argument("--stages", default="20:6,90:6,10:0")
    p.add_argument("--user-rate", type=float, default=2.0)
    p.add_argument("--port", type=int, default=int(os.environ.get("PE_FAKE_CLUSTER_PORT", "8765")))
    p.add_argument("--ready-timeout-s", type=float, default=300)
    p.add_argument("--tail-margin-s", type=float, default=120)
    p.add_argument("--out", default="docs/loadtest-fake-cluster")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not opts.yes:
        print("refusing: this stops every Ray process on the machine; pass --yes", file=sys.stderr)
        return 2
    # AutoscalingCluster shells out to `ray start`: use this interpreter's, not the PATH's.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    report = run(opts)
    keys = ("requests", "throughput_rps", "errors_by_status", "replica_events", "resource_node_events")
    print(json.dumps({k: report.get(k) for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
