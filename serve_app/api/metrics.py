"""Prometheus metrics of one ingress replica, served at ``GET /metrics`` (no ``ray_`` prefix).

The names follow docs/SCALING.md, "Metrics contract". The ingress records what it sees of a
request: ``photoenhance_requests_total{route,status}``, ``photoenhance_request_seconds{route}``
and ``photoenhance_stage_seconds{stage}`` (the whole path of each image: decode, queue, the
engine's stages, transfer, encode), plus two extras, ``photoenhance_requests_in_flight`` and
``photoenhance_weights_synthetic``. The model replicas record batches, images, faces, GPU
memory and engine stages through Ray (``serve_app.deployments.model``); those appear on Ray's
metrics port as ``ray_photoenhance_*``. Each ingress replica has its own registry, so a scrape
reaches one replica.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(  # exported as photoenhance_requests_total
    "photoenhance_requests",
    "HTTP requests by route template and status code.",
    ["route", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "photoenhance_request_seconds",
    "HTTP request latency (first byte in to response start and body sent), by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "photoenhance_stage_seconds",
    "Seconds per image and stage: probe (header check at the ingress), then in the model "
    "replica decode, queue, the engine's stages (detect, restore, parse, upsample, paste) and "
    "its total (engine), encode; transfer is the rest of the model call.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "photoenhance_requests_in_flight",
    "HTTP requests being handled by this ingress replica.",
    registry=REGISTRY,
)
WEIGHTS_SYNTHETIC = Gauge(
    "photoenhance_weights_synthetic",
    "1 when the model replicas run synthetic (random) weights.",
    registry=REGISTRY,
)

DOOR_ACTIVE = Gauge(
    "photoenhance_door_active",
    "Enhance requests past this ingress replica's door (decoding, in the model, encoding).",
    registry=REGISTRY,
)
DOOR_WAITING = Gauge(
    "photoenhance_door_waiting",
    "Enhance requests waiting at this ingress replica's door.",
    registry=REGISTRY,
)
DOOR_DRAIN_RATE = Gauge(
    "photoenhance_door_drain_per_second",
    "Enhance requests finished per second (last 30 s): what Retry-After is derived from.",
    registry=REGISTRY,
)

_NOT_STAGES = frozenset({"total"})  # the whole call: photoenhance_request_seconds covers it


def observe_request(route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(route, str(status)).inc()
    REQUEST_SECONDS.labels(route).observe(seconds)


def observe_stages(timings: Mapping[str, float]) -> None:
    for stage, seconds in timings.items():
        if stage not in _NOT_STAGES:
            STAGE_SECONDS.labels(stage).observe(seconds)


def render() -> bytes:
    return generate_latest(REGISTRY)
