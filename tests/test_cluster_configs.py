"""The files in cluster/ parse, validate with Ray's own schemas, and agree with the package
and with configs/gpu.yaml. No Ray is started."""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from serve_app.config import APP_NAME, AppConfig
from serve_app.deployments.autoscaling import POLICY_FUNCTION, autoscaling_options

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
sys.path.insert(0, str(CLUSTER))

import fake_cluster  # noqa: E402
import make_dashboard  # noqa: E402
import sync_configs  # noqa: E402


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def resolve(import_path: str) -> Any:
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load(CLUSTER / "rayservice.yaml")


def test_rayservice_embeds_gpu_yaml(rayservice: dict[str, Any]) -> None:
    assert rayservice["kind"] == "RayService" and rayservice["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded == load(ROOT / "configs" / "gpu.yaml")
    assert sync_configs.main(["--check"]) == 0


def test_rayservice_serve_config_is_deployable(rayservice: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = schema.applications
    assert app.name == APP_NAME
    assert callable(resolve(app.import_path))
    config = AppConfig.model_validate(app.args)
    assert config.name == APP_NAME
    serve_cfg = ServeAutoscalingConfig(**autoscaling_options(config.model.autoscaling))
    assert serve_cfg.policy.policy_function == POLICY_FUNCTION
    assert resolve(POLICY_FUNCTION)


def test_rayservice_gpu_group_fits_the_model(rayservice: dict[str, Any]) -> None:
    import ray

    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    model = AppConfig.model_validate(
        yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    ).model
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert model.num_gpus > 0 and gpus >= model.num_gpus
    replicas_per_pod = int(gpus // model.num_gpus)
    assert group["maxReplicas"] * replicas_per_pod >= model.autoscaling.max_replicas
    assert group["minReplicas"] <= group["maxReplicas"]
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head["num-gpus"] == "0" and head["metrics-export-port"] == "8080"


def test_launcher_config_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(CLUSTER / "launcher-aws.yaml")
    validate_config(prepare_config(raw))
    gpu = raw["available_node_types"]["gpu_worker"]
    model = AppConfig.model_validate(load(ROOT / "configs" / "gpu.yaml")["applications"][0]["args"]).model
    assert gpu["resources"]["GPU"] >= model.num_gpus
    assert gpu["max_workers"] * int(gpu["resources"]["GPU"] // model.num_gpus) >= model.autoscaling.max_replicas
    assert raw["head_node_type"] in raw["available_node_types"]
    setup = " ".join(raw["setup_commands"])
    assert "requirements.lock" in setup and "-e ~/photoenhance" in setup
    assert raw["file_mounts"]["~/photoenhance"] == "."


def test_fake_cluster_config_and_app() -> None:
    from ray.autoscaler._private.util import validate_config

    base = load(CLUSTER / "fake_multinode.yaml")
    assert base["provider"]["type"] == "fake_multinode"
    validate_config(base)
    config = fake_cluster.generate_config(
        {"CPU": 2}, fake_cluster.worker_node_types(3), max_workers=3, idle_timeout_minutes=0.5
    )
    validate_config(config)
    worker = config["available_node_types"][fake_cluster.WORKER_TYPE]
    assert worker["resources"][fake_cluster.RESOURCE] == 1
    assert set(config["available_node_types"]["ray.head.default"]["resources"]) == {"CPU"}

    app = AppConfig.model_validate(fake_cluster.app_args(3, Path("/tmp/x")))
    assert app.model.resources == {fake_cluster.RESOURCE: 1}
    assert app.model.num_cpus <= worker["resources"]["CPU"]
    assert app.model.autoscaling.max_replicas == 3
    ServeAutoscalingConfig(**autoscaling_options(app.model.autoscaling))


def test_fake_cluster_stops_only_its_own_processes(tmp_path: Path) -> None:
    """The processes naming the cluster's temp dir and their children go; others stay."""
    import subprocess
    import time

    own_dir = tmp_path / "pefc-own"
    own_dir.mkdir()
    parent = subprocess.Popen(  # like a raylet: names the temp dir, has a child
        [sys.executable, "-c", "import subprocess, sys, time; "
         "subprocess.Popen(['sleep', '120']); time.sleep(120)", f"--temp-dir={own_dir}"]
    )
    other = subprocess.Popen(["sleep", "120"])
    try:
        deadline = time.monotonic() + 30
        while len(fake_cluster.own_processes(own_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = {p.pid for p in fake_cluster.own_processes(own_dir)}
        assert parent.pid in found and other.pid not in found and len(found) == 2
        fake_cluster.stop_own_processes(own_dir, grace_s=5)
        assert parent.wait(timeout=10) is not None
        assert fake_cluster.own_processes(own_dir) == []
        assert other.poll() is None  # not ours: still running
    finally:
        other.kill()
        parent.kill()


def test_prometheus_scrapes_ray_and_the_ingress() -> None:
    raw = load(CLUSTER / "prometheus.yml")
    jobs = {job["job_name"]: job for job in raw["scrape_configs"]}
    assert {"ray", "photoenhance", "kuberay-pods"} <= set(jobs)
    assert jobs["photoenhance"]["metrics_path"] == "/metrics"
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def _contract_names() -> set[str]:
    text = (ROOT / "docs" / "SCALING.md").read_text()
    table = text.split("## Metrics contract", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(photoenhance_\w+)`", table, flags=re.M))


def test_dashboard_uses_contract_names_only() -> None:
    assert make_dashboard.main(["--check"]) == 0
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    contract = _contract_names()
    assert len(contract) == 11
    bases = set()
    for name in contract:  # counters and histograms as Prometheus spells their series
        base = name.removesuffix("_total")
        bases |= {name, f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"(?:\$\{prefix\}|ray_)?[a-z_]+(?=[{\[)\s]|$)", expr):
            if "photoenhance_" in name or name.startswith(("ray_serve_", "ray_cluster_")):
                used.add(name)
    assert used
    plain = set()
    for name in used:
        if name.startswith(("ray_serve_", "ray_cluster_")):
            continue
        base = name.removeprefix("${prefix}").removeprefix("ray_")
        assert base in bases, f"{name} is not in the metrics contract"
        for suffix in ("_bucket", "_sum", "_count"):
            base = base.removesuffix(suffix)
        plain.add(base)
    assert plain == contract  # and every contract metric has a panel


def test_policy_gauge_names_are_in_the_contract() -> None:
    source = (ROOT / "serve_app" / "deployments" / "autoscaling.py").read_text()
    gauges = set(re.findall(r'Gauge\(\s*"(photoenhance_\w+)"', source))
    assert gauges == {"photoenhance_replicas_wanted", "photoenhance_queue_depth", "photoenhance_job_backlog"}
    assert gauges <= _contract_names()


def test_every_pod_runs_the_haproxy_ingress_and_prometheus_scrapes_it(rayservice: dict[str, Any]) -> None:
    """The flag is read by the controller, the proxies and the replicas alike: a pod without it
    would mix the two ingresses. Its metrics port is named where the pod scrape finds it."""
    spec = rayservice["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # Ray 2.60's default (constants.RAY_SERVE_HAPROXY_METRICS_PORT)
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT

        assert ports["haproxy-metrics"] == RAY_SERVE_HAPROXY_METRICS_PORT
    pods = {job["job_name"]: job for job in load(CLUSTER / "prometheus.yml")["scrape_configs"]}
    keep = [r for r in pods["kuberay-pods"]["relabel_configs"]
            if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]]
    assert re.fullmatch(keep[0]["regex"], "haproxy-metrics")
    assert re.fullmatch(keep[0]["regex"], "metrics")


def test_the_head_keeps_its_tables_in_redis(rayservice: dict[str, Any]) -> None:
    """A head pod's restart is survivable only with GCS fault tolerance
    (tests/test_head_restart.py proves it on one machine)."""
    ft = rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].startswith("redis://")


# KubeRay's RayService CRD, as a KubeRay release publishes it
# (ray-operator/config/crd/bases/ray.io_rayservices.yaml). Developers may not commit it (a
# copy of another project's file), so the steering repo's shared/ holds it, or
# PHOTOENHANCE_KUBERAY_CRD names a copy.
KUBERAY_CRD = Path(os.environ.get("PHOTOENHANCE_KUBERAY_CRD")
                   or ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml")


def _as_the_api_server_prunes(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused: the API server silently prunes a field its
    structural schema does not name (a misspelt key would just vanish), so here it fails."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _as_the_api_server_prunes(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _as_the_api_server_prunes(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_as_the_api_server_prunes(sub) for sub in value]
        else:
            out[key] = value
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.mark.skipif(not KUBERAY_CRD.is_file(),
                    reason=f"KubeRay's RayService CRD is not at {KUBERAY_CRD} (see the comment)")
def test_rayservice_is_valid_for_kuberays_crd(rayservice: dict[str, Any]) -> None:
    import jsonschema

    crd = load(KUBERAY_CRD)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == rayservice["apiVersion"].split("/")[1]]
    schema = _as_the_api_server_prunes(served["schema"]["openAPIV3Schema"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(rayservice), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:20])
    # And the check can fail: a misspelt field is refused, not pruned.
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert any("enableInTreeAutoscalling" in e.message
               for e in jsonschema.Draft7Validator(schema).iter_errors(broken))
