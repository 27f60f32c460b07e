"""The Serve application: ``serve_app.deployments.app:build_app`` is the config's import path.

``args`` are an ``AppConfig``; every deployment number (resources, concurrency, queue
limits, replicas, autoscaling, shutdown) is read from it here, once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.serve import Application

from serve_app.config import AppConfig
from serve_app.deployments.autoscaling import autoscaling_options

LOGGER = logging.getLogger(__name__)

def resolve_paths(config: AppConfig, base: Path | None = None) -> AppConfig:
    """Make relative folders absolute (against ``base`` or the working directory), so that
    replicas, whose working directory is Ray's, find the same ones."""
    base = (base or Path.cwd()).resolve()

    def absolute(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    return config.model_copy(
        update={
            "weights": config.weights.model_copy(update={"dir": absolute(config.weights.dir)}),
            "jobs": config.jobs.model_copy(update={"data_dir": absolute(config.jobs.data_dir)}),
        }
    )


def deployment_options(config: AppConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve options of (model, ingress)."""
    m = config.model
    actor: dict[str, Any] = {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus}
    if m.resources:
        actor["resources"] = dict(m.resources)
    model: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests,
        "health_check_period_s": m.health_check_period_s,
        "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
    }
    scaling = m.autoscaling
    if scaling.min_replicas == scaling.max_replicas:
        model["num_replicas"] = scaling.max_replicas
    else:
        model["autoscaling_config"] = autoscaling_options(scaling)

    i = config.ingress
    ingress: dict[str, Any] = {
        "num_replicas": i.num_replicas,
        "ray_actor_options": {"num_cpus": i.num_cpus},
        # Room for every request the door admits or queues, plus the other routes: beyond
        # it requests would wait in the proxy, unbounded and unseen.
        "max_ongoing_requests": max(
            i.max_ongoing_requests, config.ingress_inflight() + i.max_queued_requests + 16
        ),
        # An ingress replica being replaced (a config or code upgrade) still holds requests
        # waiting at its door and on a model that may itself be restarting: it may stop only
        # once they are answered, or the proxy answers them 500 (tests/test_config_change.py).
        "graceful_shutdown_timeout_s": max(
            m.graceful_shutdown_timeout_s, i.queue_timeout_s + i.request_timeout_s + 5
        ),
    }
    if i.max_replicas is not None and i.max_replicas > i.num_replicas:
        # The head's share of each request (header probe, routing) grows with the traffic:
        # more ingress replicas, never one replica as the ceiling.
        del ingress["num_replicas"]
        ingress["autoscaling_config"] = {
            "min_replicas": i.num_replicas,
            "max_replicas": i.max_replicas,
            "target_ongoing_requests": i.target_ongoing_requests,
        }
    return model, ingress


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Validate ``args`` as an ``AppConfig`` and bind the ingress over the model."""
    from serve_app.deployments.ingress import Ingress
    from serve_app.deployments.model import Enhancer

    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    config = resolve_paths(config)
    payload = config.model_dump(mode="json")
    model_opts, ingress_opts = deployment_options(config)
    model = Enhancer.options(**model_opts).bind(payload)
    return Ingress.options(**ingress_opts).bind(payload, model)
