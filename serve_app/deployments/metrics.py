"""Prometheus metrics of one ingress replica, served at ``GET /metrics``.

Each replica has its own registry (a scrape reaches one replica); Ray's own ``ray_serve_*``
metrics, exported by every node, cover the whole cluster. Other modules add their metrics
to ``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

HTTP_REQUESTS = Counter(
    "photoenhance_http_requests",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "photoenhance_http_request_duration_seconds",
    "HTTP request latency by route, method and status.",
    ["route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
HTTP_INFLIGHT = Gauge(
    "photoenhance_http_requests_in_flight",
    "HTTP requests being handled by this replica.",
    registry=REGISTRY,
)
STAGE_LATENCY = Histogram(
    "photoenhance_stage_duration_seconds",
    "Time per processing stage (decode, queue, engine stages, encode).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
IMAGES = Counter(
    "photoenhance_images",
    "Images enhanced (any entry point) by outcome code ('ok' or an error code).",
    ["outcome"],
    registry=REGISTRY,
)
FACES = Counter("photoenhance_faces_restored", "Faces restored.", registry=REGISTRY)
INPUT_PIXELS = Counter(
    "photoenhance_input_pixels", "Input pixels of enhanced images.", registry=REGISTRY
)
WEIGHTS_SYNTHETIC = Gauge(
    "photoenhance_weights_synthetic",
    "1 when the model replicas run synthetic (random) weights.",
    registry=REGISTRY,
)


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_LATENCY.labels(route, method, str(status)).observe(seconds)


def observe_image(timings: Mapping[str, float], faces: int, pixels: int) -> None:
    for stage, seconds in timings.items():
        STAGE_LATENCY.labels(stage).observe(seconds)
    IMAGES.labels("ok").inc()
    FACES.inc(faces)
    INPUT_PIXELS.inc(pixels)


def observe_failure(code: str) -> None:
    IMAGES.labels(code).inc()


def render() -> bytes:
    return generate_latest(REGISTRY)
