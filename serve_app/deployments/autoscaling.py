"""Queue-depth autoscaling of the model deployment.

The load of the deployment is the requests running and queued at its replicas and handles
(``ctx.total_num_requests``, averaged by Serve over ``look_back_period_s``) plus the job
backlog, the items that the job actor has not dispatched yet, which the model replicas report
through ``record_autoscaling_stats`` (see ``serve_app.deployments.backlog``). The policy wants
``ceil(load / target_queue_depth)`` replicas; it shrinks only to a count that would still run
at most ``(1 - hysteresis) * target_queue_depth`` per replica, so a load near a boundary does
not make it flap.

What Serve 2.60 does around a custom policy (``ray/serve/autoscaling_policy.py``,
``_apply_autoscaling_config``, applied by ``_private/autoscaling_state.py``): it skips the
policy on a cold start (0 replicas, requests waiting), applies ``upscaling_factor`` and
``downscaling_factor``, waits ``upscale_delay_s`` / ``downscale_delay_s`` /
``downscale_to_zero_delay_s`` (wall clock, restarted whenever the wish changes direction or
goes away), and clamps to ``min_replicas`` / ``max_replicas``. So this policy applies no
delays of its own: they would add up with Serve's.

The policy class is cloudpickled by value into the Serve controller, so what it uses at call
time is limited to the standard library, ``ray`` and this module.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

    from serve_app.config import AppConfig, AutoscalingConfig

# A child of Serve's logger: in the controller only "ray.serve" has handlers (its log file).
LOGGER = logging.getLogger(f"ray.serve.{__name__}")

POLICY_FUNCTION = "serve_app.deployments.autoscaling:QueueDepthPolicy"
JOB_BACKLOG_METRIC = "job_backlog"
"""Name under which model replicas report the job backlog in ``record_autoscaling_stats``."""

_STATE_KEY = "photoenhance"
_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class PolicyParams:
    """The policy's ``policy_kwargs``, checked once when the controller builds it."""

    target_queue_depth: float
    hysteresis: float = 0.25
    backlog_weight: float = 1.0
    allow_scale_to_zero: bool = False
    backlog_metric: str = JOB_BACKLOG_METRIC
    log_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.target_queue_depth > 0:
            raise ValueError("target_queue_depth must be > 0")
        if not 0 <= self.hysteresis < 1:
            raise ValueError("hysteresis must be in [0, 1)")
        if self.backlog_weight < 0:
            raise ValueError("backlog_weight must be >= 0")
        if self.log_interval_s < 0:
            raise ValueError("log_interval_s must be >= 0")


@dataclass(frozen=True)
class Decision:
    """One tick's numbers: what the policy saw and what it asked for (before Serve's delays)."""

    replicas: int
    reason: str  # "up", "down", "hold", "band" (inside the hysteresis band), "zero"
    requests: float
    backlog: float
    load: float
    target: int  # Serve's current target
    running: int
    floor: int
    ceiling: int

    def line(self, deployment: str) -> str:
        return (
            f"autoscaling {deployment}: want {self.replicas} ({self.reason}) "
            f"target={self.target} running={self.running} load={self.load:.1f} "
            f"(requests={self.requests:.1f} backlog={self.backlog:.0f}) "
            f"bounds=[{self.floor},{self.ceiling}]"
        )


def job_backlog(ctx: AutoscalingContext, metric: str = JOB_BACKLOG_METRIC) -> float:
    """The backlog reported by the replicas. Every replica reads the same job actor, so the
    figures are copies of one number, not shares of it: take the largest."""
    per_replica = (ctx.aggregated_metrics or {}).get(metric) or {}
    values = [float(v) for v in per_replica.values() if v is not None and math.isfinite(v)]
    return max(max(values, default=0.0), 0.0)


def decide(ctx: AutoscalingContext, params: PolicyParams) -> Decision:
    """The replica count wanted for this context: a pure function of its arguments."""
    requests = max(float(ctx.total_num_requests or 0.0), 0.0)
    backlog = job_backlog(ctx, params.backlog_metric)
    load = requests + params.backlog_weight * backlog
    current = int(ctx.target_num_replicas)
    ceiling = int(ctx.capacity_adjusted_max_replicas)
    floor = int(ctx.capacity_adjusted_min_replicas)
    if not params.allow_scale_to_zero:
        floor = max(floor, 1)
    floor = min(floor, ceiling)

    up = math.ceil(load / params.target_queue_depth - _EPS)
    if up > current:
        wanted, reason = up, "up"
    elif up == current:
        wanted, reason = current, "hold"
    else:
        # Shrink only as far as the smaller fleet stays below the low-water mark.
        low_water = params.target_queue_depth * (1.0 - params.hysteresis)
        wanted = min(current, math.ceil(load / low_water - _EPS))
        reason = "down" if wanted < current else "band"
    if wanted == 0 and floor == 0:
        reason = "zero"

    clamped = min(max(wanted, floor), ceiling)
    if clamped != wanted:
        reason += ",max" if clamped < wanted else ",min"
    return Decision(
        replicas=clamped,
        reason=reason,
        requests=requests,
        backlog=backlog,
        load=load,
        target=current,
        running=int(ctx.current_num_replicas),
        floor=floor,
        ceiling=ceiling,
    )


def should_log(decision: Decision, previous: dict[str, Any] | None, now: float, every_s: float) -> bool:
    """Log when the wish, its reason or Serve's target changes, and as a heartbeat."""
    if not previous:
        return True
    changed = (decision.replicas, decision.reason, decision.target) != (
        previous.get("replicas"),
        previous.get("reason"),
        previous.get("target"),
    )
    return changed or (every_s > 0 and now - float(previous.get("logged_at", 0.0)) >= every_s)


class QueueDepthPolicy:
    """``autoscaling_config.policy.policy_function``; Serve builds it once with the kwargs
    (``policy_kwargs`` reach a class only, never a plain function) and calls it every tick."""

    def __init__(self, **kwargs: Any) -> None:
        self.params = PolicyParams(**kwargs)
        self._gauges: dict[str, Any] | None = None

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        decision = decide(ctx, self.params)
        now = float(ctx.current_time if ctx.current_time is not None else time.time())
        previous = (ctx.policy_state or {}).get(_STATE_KEY)
        state = {**asdict(decision), "logged_at": (previous or {}).get("logged_at", 0.0)}
        if should_log(decision, previous, now, self.params.log_interval_s):
            LOGGER.info(decision.line(f"{ctx.app_name}/{ctx.deployment_name}"))
            state["logged_at"] = now
        self._export(ctx, decision)
        # Serve merges its own delay bookkeeping into this dict.
        return decision.replicas, {_STATE_KEY: state}

    def _export(self, ctx: AutoscalingContext, decision: Decision) -> None:
        try:
            gauges = self._gauges if self._gauges is not None else self._make_gauges()
            tags = {"deployment": ctx.deployment_name, "application": ctx.app_name or ""}
            gauges["wanted"].set(decision.replicas, tags=tags)
            gauges["queue"].set(decision.requests, tags=tags)
            gauges["backlog"].set(decision.backlog, tags=tags)
        except Exception:  # a metric must never stop scaling
            LOGGER.debug("autoscaling metrics not exported", exc_info=True)

    def _make_gauges(self) -> dict[str, Any]:
        from ray.util.metrics import Gauge

        keys = ("deployment", "application")
        self._gauges = {
            "wanted": Gauge(
                "photoenhance_replicas_wanted",
                description="Replicas the queue-depth policy asks for, before Serve's delays.",
                tag_keys=keys,
            ),
            "queue": Gauge(
                "photoenhance_queue_depth",
                description="Requests running and queued at the deployment, as the autoscaler sees them.",
                tag_keys=keys,
            ),
            "backlog": Gauge(
                "photoenhance_job_backlog",
                description="Job items not yet dispatched, as the autoscaler sees them.",
                tag_keys=keys,
            ),
        }
        return self._gauges


# ------------------------------------------------------------------ deployment options


def policy_kwargs(cfg: AutoscalingConfig) -> dict[str, Any]:
    return {
        "target_queue_depth": cfg.target_queue_depth,
        "hysteresis": cfg.hysteresis,
        "backlog_weight": cfg.backlog_weight,
        "allow_scale_to_zero": cfg.allow_scale_to_zero,
        "backlog_metric": JOB_BACKLOG_METRIC,
    }


def autoscaling_options(cfg: AutoscalingConfig) -> dict[str, Any]:
    """The model deployment's Serve ``autoscaling_config`` (a dict, as in a Serve YAML)."""
    options: dict[str, Any] = {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        # Read by nothing but Serve's own gauge of it; kept equal for the dashboards.
        "target_ongoing_requests": cfg.target_queue_depth,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        # In 2.60 this still sets how often replicas and handles push their figures.
        "metrics_interval_s": cfg.metrics_interval_s,
        "look_back_period_s": cfg.look_back_period_s,
        "policy": {"policy_function": POLICY_FUNCTION, "policy_kwargs": policy_kwargs(cfg)},
    }
    if cfg.initial_replicas is not None:
        options["initial_replicas"] = cfg.initial_replicas
    if cfg.downscale_to_zero_delay_s is not None:
        options["downscale_to_zero_delay_s"] = cfg.downscale_to_zero_delay_s
    return options


def policy_config(app: AppConfig) -> dict[str, Any]:
    """The ``policy`` entry alone, for builders that assemble the rest themselves."""
    return {"policy_function": POLICY_FUNCTION, "policy_kwargs": policy_kwargs(app.model.autoscaling)}
