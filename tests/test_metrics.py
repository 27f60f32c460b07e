"""The metrics contract: every project metric the Grafana dashboard queries is exported.

Names without a prefix must appear at the ingress's ``GET /metrics`` after a real request on
the session server; ``ray_``-prefixed names must be declared through Ray
(``ray.serve.metrics`` / ``ray.util.metrics``) in model.py or autoscaling.py, which Ray exports
on its metrics port as ``ray_<name>`` (counters with ``_total``).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "cluster" / "grafana-dashboard.json"
RAY_RECORDERS = (
    ROOT / "serve_app" / "deployments" / "model.py",
    ROOT / "serve_app" / "deployments" / "autoscaling.py",
)
RAY_METRIC_MODULES = ("ray.serve.metrics", "ray.util.metrics")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_names() -> set[str]:
    """The ``photoenhance_*`` / ``ray_photoenhance_*`` series the dashboard's PromQL reads."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    names: set[str] = set()
    for expr in exprs:
        assert "${prefix}" not in expr, "each metric is read from one place, without a prefix variable"
        names |= set(re.findall(r"\b(?:ray_)?photoenhance_[a-z0-9_]+", expr))
    return names


def ray_declared_series() -> dict[str, str]:
    """Series Ray exports for the Ray metrics declared in the recorder modules: name -> file."""
    series: dict[str, str] = {}
    for path in RAY_RECORDERS:
        tree = ast.parse(path.read_text())
        kinds: dict[str, str] = {}  # local name -> Counter / Gauge / Histogram
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in RAY_METRIC_MODULES:
                for alias in node.names:
                    if alias.name in ("Counter", "Gauge", "Histogram"):
                        kinds[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            kind = kinds.get(node.func.id)
            if kind is None or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            name = str(node.args[0].value)
            assert name.startswith("photoenhance_"), name
            assert not name.endswith("_total"), f"{name}: Ray adds _total to counters itself"
            base = f"ray_{name}"
            if kind == "Counter":
                found = {f"{base}_total"}
            elif kind == "Histogram":
                found = {base + s for s in HISTOGRAM_SUFFIXES}
            else:
                found = {base}
            series.update(dict.fromkeys(found, path.name))
    return series


def test_ray_declarations_cover_the_replica_and_policy_metrics() -> None:
    declared = ray_declared_series()
    for name in (
        "ray_photoenhance_batch_size_bucket",
        "ray_photoenhance_batch_pixels_bucket",
        "ray_photoenhance_stage_seconds_bucket",
        "ray_photoenhance_images_total",
        "ray_photoenhance_faces_total",
        "ray_photoenhance_gpu_memory_bytes",
        "ray_photoenhance_queue_depth",
        "ray_photoenhance_job_backlog",
        "ray_photoenhance_replicas_wanted",
    ):
        assert name in declared, name


def test_every_dashboard_metric_is_exported(http: Any, images: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    data = images.cv2_bytes(images.array(8, 8), ".png")
    r = http.post("/v1/enhance", params={"face": "false", "bg_model": "none"}, content=data)
    assert r.status_code == 200
    text = http.get("/metrics").text
    ingress = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    ray_series = ray_declared_series()

    used = dashboard_names()
    assert any(n.startswith("ray_") for n in used) and any(not n.startswith("ray_") for n in used)
    missing = []
    for name in sorted(used):
        if name.startswith("ray_"):
            if name not in ray_series:
                missing.append(f"{name}: not declared through Ray in model.py / autoscaling.py")
        elif name not in ingress:
            missing.append(f"{name}: not at the ingress's /metrics")
    assert not missing, "\n".join(missing)


def test_ingress_stage_timings_cover_the_whole_path(http: Any, images: Any) -> None:
    data = images.cv2_bytes(images.array(16, 16), ".png")
    assert http.post("/v1/enhance", params={"upscale": "1"}, content=data).status_code == 200
    text = http.get("/metrics").text
    stages = set(re.findall(r'photoenhance_stage_seconds_count\{stage="(\w+)"\}', text))
    assert {"decode", "queue", "engine", "transfer", "encode"} <= stages
    assert stages & {"detect", "restore", "parse", "upsample", "paste"}
    assert "total" not in stages


# ---------------------------------------------------------------------------- replica recorder


class _Fake:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str] | None]] = []

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, tags))

    inc = set = observe


@pytest.fixture
def replica_metrics() -> Any:
    from serve_app.deployments.model import ReplicaMetrics

    m = ReplicaMetrics.__new__(ReplicaMetrics)  # no Ray metrics: fakes record the calls
    for attr in ("batch_size", "batch_pixels", "stage_seconds", "images", "faces", "gpu_memory"):
        setattr(m, attr, _Fake())
    m._cuda = None
    m._tags = {n: {"stage": n} for n in ("queue", "engine", "detect", "restore", "parse",
                                          "upsample", "paste")}
    m._ok = {"outcome": "ok"}
    return m


def test_replica_metrics_record_one_batch(replica_metrics: Any) -> None:
    import numpy as np

    from serve_app.deployments.model import _Work
    from serve_app.engine.types import EnhanceResult
    from serve_app.errors import ImageTooLargeForDevice

    works = [_Work(np.zeros((h, 10, 3), np.uint8), None, 1.0, 0.0) for h in (4, 6, 8)]  # type: ignore[arg-type]
    ok = {"queue": 0.01, "detect": 0.2, "restore": 0.3, "total": 0.6}
    results = [
        EnhanceResult(works[0].image, 2, dict(ok)),
        EnhanceResult(works[1].image, 1, {**ok, "queue": 0.02, "detect": 0.25}),
        ImageTooLargeForDevice("too big"),
    ]
    m = replica_metrics
    m.record(works, results)
    assert m.batch_size.calls == [(3, None)]
    assert m.batch_pixels.calls == [(180, None)]
    assert m.faces.calls == [(3, None)]
    assert sorted(m.images.calls, key=lambda c: c[1]["outcome"]) == [
        (2, {"outcome": "ok"}), (1, {"outcome": ImageTooLargeForDevice.default_code})]
    stages = [(tags["stage"], v) for v, tags in m.stage_seconds.calls]
    assert sorted(stages) == [("detect", 0.25), ("engine", 0.6), ("queue", 0.01), ("queue", 0.02),
                              ("restore", 0.3)]  # engine stages once per batch, queue per image
    assert m.gpu_memory.calls == []  # CPU: never set
