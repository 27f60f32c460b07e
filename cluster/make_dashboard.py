"""Write ``cluster/grafana-dashboard.json`` from the metric names of docs/SCALING.md.

    .venv/bin/python cluster/make_dashboard.py           # rewrite
    .venv/bin/python cluster/make_dashboard.py --check   # exit 1 when the file differs

Each project metric is read where it is exported (docs/SCALING.md, "Metrics contract"):
``photoenhance_*`` from the ingress's ``GET /metrics`` (prometheus_client: requests, request
latency, per-image stages) and ``ray_photoenhance_*`` from Ray's metrics port (recorded
through Ray by the model replicas: batches, images, faces, GPU memory, engine stages; and by
the autoscaling policy in the controller: replicas wanted, queue depth, job backlog).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGET = Path(__file__).with_name("grafana-dashboard.json")
P = "photoenhance_"  # ingress /metrics
RAY = "ray_photoenhance_"  # Ray's metrics port
MODEL = 'deployment="Enhancer"'
R = "[$__rate_interval]"


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", **extra: Any) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
        **extra,
    }


def quantiles(metric: str, by: str, selector: str = "") -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{selector}{R})))",
         f"p{int(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.95, 0.99)
    ]


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Traffic", [
        panel("Requests per second by route and status",
              [(f"sum by (route, status) (rate({P}requests_total{R}))", "{{route}} {{status}}")], "reqps"),
        panel("Error ratio (5xx)", [(
            f'sum(rate({P}requests_total{{status=~"5.."}}{R})) / clamp_min(sum(rate({P}requests_total{R})), 1e-9)',
            "5xx share")], "percentunit"),
        panel("Request latency", quantiles(f"{P}request_seconds", "route"), "s"),
        panel("Stage latency p95 (ingress: whole path per image)", [(
            f"histogram_quantile(0.95, sum by (le, stage) (rate({P}stage_seconds_bucket{R})))",
            "{{stage}}")], "s"),
    ]),
    ("Work (model replicas)", [
        panel("Images and faces per second", [
            (f"sum by (outcome) (rate({RAY}images_total{{{MODEL}}}{R}))", "images {{outcome}}"),
            (f"sum(rate({RAY}faces_total{{{MODEL}}}{R}))", "faces"),
        ], "ops"),
        panel("Engine stage latency p95 (queue per image, stages per batch)", [(
            f"histogram_quantile(0.95, sum by (le, stage) (rate({RAY}stage_seconds_bucket{{{MODEL}}}{R})))",
            "{{stage}}")], "s"),
        panel("Batch size", [
            (f"sum(rate({RAY}batch_size_sum{{{MODEL}}}{R})) / "
             f"clamp_min(sum(rate({RAY}batch_size_count{{{MODEL}}}{R})), 1e-9)", "mean"),
            (f"histogram_quantile(0.95, sum by (le) (rate({RAY}batch_size_bucket{{{MODEL}}}{R})))", "p95"),
        ]),
        panel("Batch pixels", [
            (f"sum(rate({RAY}batch_pixels_sum{{{MODEL}}}{R})) / "
             f"clamp_min(sum(rate({RAY}batch_pixels_count{{{MODEL}}}{R})), 1e-9)", "mean"),
            (f"histogram_quantile(0.95, sum by (le) (rate({RAY}batch_pixels_bucket{{{MODEL}}}{R})))", "p95"),
        ]),
        panel("GPU memory held (CUDA replicas only)",
              [(f"sum by (replica) ({RAY}gpu_memory_bytes{{{MODEL}}})", "{{replica}}")], "bytes"),
    ]),
    ("Autoscaling", [
        panel("Model replicas: wanted, Serve's target, running", [
            (f"max({RAY}replicas_wanted{{{MODEL}}})", "wanted by the policy"),
            (f"max(ray_serve_autoscaling_target_replicas{{{MODEL}}})", "Serve target"),
            (f"sum(ray_serve_deployment_replica_healthy{{{MODEL}}})", "running (healthy)"),
        ]),
        panel("Queue depth and job backlog (as the policy sees them)", [
            (f"max({RAY}queue_depth{{{MODEL}}})", "requests running + queued"),
            (f"max({RAY}job_backlog{{{MODEL}}})", "job items not dispatched"),
            (f"sum(ray_serve_deployment_queued_queries{{{MODEL}}})", "queued at handles"),
            (f"sum(ray_serve_num_ongoing_requests_at_replicas{{{MODEL}}})", "ongoing at replicas"),
        ]),
        panel("Model processing latency (Serve)",
              quantiles("ray_serve_deployment_processing_latency_ms", "deployment", f"{{{MODEL}}}"), "ms"),
        panel("Cluster nodes", [
            ("sum by (node_type) (ray_cluster_active_nodes)", "active {{node_type}}"),
            ("sum by (node_type) (ray_cluster_pending_nodes)", "pending {{node_type}}"),
        ]),
    ]),
]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, p in enumerate(row):
            panels.append({**p, "id": pid, "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)}})
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "title": "PhotoEnhance",
        "uid": "photoenhance",
        "tags": ["photoenhance", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    text = render()
    if TARGET.exists() and TARGET.read_text() == text:
        return 0
    if args.check:
        print(f"{TARGET} is out of date: run cluster/make_dashboard.py", file=sys.stderr)
        return 1
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
