"""The queue-depth policy over hand-built contexts, alone and inside Serve's own wrapper
(delays, factors, cold start), with a fake clock. No Ray is started."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve import autoscaling_policy as serve_policy
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.config import AutoscalingContext

from serve_app.config import AppConfig, AutoscalingConfig
from serve_app.deployments.autoscaling import (
    JOB_BACKLOG_METRIC,
    LOGGER,
    POLICY_FUNCTION,
    PolicyParams,
    QueueDepthPolicy,
    autoscaling_options,
    decide,
    policy_config,
)
from serve_app.deployments.backlog import BacklogProbe

ROOT = Path(__file__).resolve().parents[1]
DEP = DeploymentID(name="Enhancer", app_name="photoenhance")


def ctx(
    *,
    requests: float = 0.0,
    backlog: float | list[float] | None = None,
    target: int = 1,
    running: int | None = None,
    lo: int = 1,
    hi: int = 4,
    state: dict[str, Any] | None = None,
    now: float = 1000.0,
    config: ServeAutoscalingConfig | None = None,
) -> AutoscalingContext:
    running = target if running is None else running
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(running)]
    metrics: dict[str, dict[ReplicaID, float]] = {}
    if backlog is not None:
        values = backlog if isinstance(backlog, list) else [backlog] * running
        metrics[JOB_BACKLOG_METRIC] = dict(zip(replicas, values, strict=False))
    return AutoscalingContext(
        deployment_id=DEP,
        deployment_name=DEP.name,
        app_name=DEP.app_name,
        current_num_replicas=running,
        target_num_replicas=target,
        running_replicas=replicas,
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


P = PolicyParams(target_queue_depth=4, hysteresis=0.25)  # low-water mark: 3 per replica


# ------------------------------------------------------------------ the pure decision


def test_burst_scales_up_to_demand_and_clamps_at_max() -> None:
    assert decide(ctx(requests=10), P).replicas == 3  # ceil(10 / 4)
    burst = decide(ctx(requests=100), P)
    assert (burst.replicas, burst.reason) == (4, "up,max")


def test_steady_load_at_target_holds() -> None:
    for requests in (5, 6.5, 8):  # ceil(x / 4) == 2
        d = decide(ctx(requests=requests, target=2), P)
        assert (d.replicas, d.reason) == (2, "hold")


def test_drain_scales_down_to_min() -> None:
    d = decide(ctx(requests=0, target=3), P)
    assert (d.replicas, d.reason) == (1, "down,min")


def test_hysteresis_band_holds_then_releases() -> None:
    # 3 replicas: ceil(7/4) = 2 would do, but 2 replicas would run at 3.5 > 3 (low water).
    assert decide(ctx(requests=7, target=3), P).reason == "band"
    assert decide(ctx(requests=7, target=3), P).replicas == 3
    assert decide(ctx(requests=6, target=3), P).replicas == 2  # 2 x 3 = 6: low enough
    no_band = PolicyParams(target_queue_depth=4, hysteresis=0)
    assert decide(ctx(requests=7, target=3), no_band).replicas == 2


def test_backlog_alone_scales_up() -> None:
    d = decide(ctx(requests=0, backlog=13), P)
    assert (d.replicas, d.backlog, d.load) == (4, 13, 13)
    weighted = PolicyParams(target_queue_depth=4, backlog_weight=0.5)
    assert decide(ctx(requests=0, backlog=13), weighted).replicas == 2  # ceil(6.5 / 4)


def test_backlog_copies_are_not_summed() -> None:
    # Every replica reports the same job actor figure: 3 replicas x 10 is a backlog of 10.
    d = decide(ctx(requests=2, backlog=[10, 10, 9.5], target=3), P)
    assert (d.backlog, d.load, d.replicas) == (10, 12, 3)


def test_missing_or_bad_backlog_counts_as_zero() -> None:
    assert decide(ctx(requests=4, backlog=[math.nan, -3]), P).backlog == 0
    assert decide(ctx(requests=4), P).replicas == 1


def test_scale_to_zero_only_where_allowed() -> None:
    zero_ok = PolicyParams(target_queue_depth=4, allow_scale_to_zero=True)
    d = decide(ctx(requests=0, target=1, lo=0), zero_ok)
    assert (d.replicas, d.reason) == (0, "zero")
    # min_replicas 0 in Serve, but the config did not allow it: never below 1.
    assert decide(ctx(requests=0, target=1, lo=0), P).replicas == 1
    # Any load at all keeps one replica.
    assert decide(ctx(requests=0.2, target=1, lo=0), zero_ok).replicas == 1
    # At zero no replica reports the backlog; the items the job actor dispatches wait at its
    # handle, and those requests bring a replica back.
    assert decide(ctx(requests=1, target=0, running=0, lo=0), zero_ok).replicas == 1


def test_clamps_to_capacity_adjusted_bounds() -> None:
    assert decide(ctx(requests=100, hi=2), P).replicas == 2
    assert decide(ctx(requests=0, target=3, lo=2), P).replicas == 2
    # target_capacity 0 makes the max 0: the max wins over the floor of 1.
    assert decide(ctx(requests=50, target=1, lo=0, hi=0), P).replicas == 0


def test_flapping_input_around_a_boundary_does_not_flap() -> None:
    """Load alternating 8.5 / 7.5 around 2 x target: one step up, then it stays."""
    target, history = 2, []
    for load in [8.5, 7.5] * 10:
        target = decide(ctx(requests=load, target=target), P).replicas
        history.append(target)
    assert history[0] == 3 and set(history[1:]) == {3}


def test_params_are_checked() -> None:
    with pytest.raises(ValueError):
        PolicyParams(target_queue_depth=0)
    with pytest.raises(ValueError):
        PolicyParams(target_queue_depth=4, hysteresis=1)
    with pytest.raises(TypeError):
        QueueDepthPolicy(target_queue_depth=4, unknown=1)


# ------------------------------------------------------------------ the policy object


def test_policy_returns_numbers_in_its_state_and_logs_changes_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = QueueDepthPolicy(target_queue_depth=4, log_interval_s=60)
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    replicas, state = policy(ctx(requests=10, now=0))
    assert replicas == 3
    assert state["photoenhance"]["load"] == 10 and state["photoenhance"]["reason"] == "up"
    assert len(caplog.records) == 1
    assert "want 3 (up) target=1 running=1 load=10.0" in caplog.records[0].getMessage()

    _, state = policy(ctx(requests=10, now=1, state=state))  # same wish: quiet
    assert len(caplog.records) == 1
    _, state = policy(ctx(requests=10, target=3, now=2, state=state))  # Serve acted
    assert len(caplog.records) == 2
    _, state = policy(ctx(requests=10, target=3, now=70, state=state))  # heartbeat
    assert len(caplog.records) == 3


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


def _simulate(
    monkeypatch: pytest.MonkeyPatch, loads: list[float], config: ServeAutoscalingConfig
) -> list[int]:
    """Serve's wrapper around the policy, one tick per second; the target follows each
    decision at once (replicas start instantly), as the controller would set it."""
    clock = _FakeClock()
    monkeypatch.setattr(serve_policy, "time", clock)
    opts = config.policy.policy_kwargs
    wrapped = serve_policy._apply_autoscaling_config(QueueDepthPolicy(**opts))
    target, state, out = config.min_replicas or 1, {}, []
    for load in loads:
        c = ctx(
            requests=load,
            target=target,
            lo=config.min_replicas,
            hi=config.max_replicas,
            state=state,
            now=clock.now,
            config=config,
        )
        decision, state = wrapped(c)
        target = max(config.min_replicas, min(config.max_replicas, decision))
        out.append(target)
        clock.now += 1.0
    return out


def _serve_config(**changes: Any) -> ServeAutoscalingConfig:
    cfg = AutoscalingConfig(
        min_replicas=1,
        max_replicas=4,
        target_queue_depth=4,
        upscale_delay_s=5,
        downscale_delay_s=20,
        look_back_period_s=30,
    ).model_copy(update=changes)
    return ServeAutoscalingConfig(**autoscaling_options(cfg))


def test_serve_delays_apply_on_top(monkeypatch: pytest.MonkeyPatch) -> None:
    """Burst: up after upscale_delay_s; drain: down after downscale_delay_s."""
    out = _simulate(monkeypatch, [14] * 10 + [0] * 30, _serve_config())
    assert out[:5] == [1] * 5 and out[5] == 4  # wish at t=0, acted on at t=5
    assert out[10:30] == [4] * 20 and out[30] == 1  # wish at t=10, acted on at t=30


def test_flapping_input_is_filtered_by_serve_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load that jumps every tick never outlasts the delay, so nothing moves."""
    out = _simulate(monkeypatch, [14, 2] * 30, _serve_config())
    assert set(out) == {1}


def test_cold_start_from_zero_skips_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _serve_config(min_replicas=0, allow_scale_to_zero=True, downscale_to_zero_delay_s=3)
    out = _simulate(monkeypatch, [0] * 5 + [6] * 3, cfg)
    assert out[:3] == [1, 1, 1] and out[3] == 0  # 1 -> 0 after downscale_to_zero_delay_s
    assert out[5] >= 1  # requests waiting at 0 replicas: straight back up


# ------------------------------------------------------------------ options and configs


def test_options_validate_as_a_serve_autoscaling_config() -> None:
    cfg = AutoscalingConfig(
        min_replicas=1, max_replicas=3, initial_replicas=2, target_queue_depth=6,
        upscale_delay_s=1, downscale_delay_s=5, downscale_to_zero_delay_s=None,
        metrics_interval_s=0.5, look_back_period_s=2,
    )
    serve_cfg = ServeAutoscalingConfig(**autoscaling_options(cfg))
    assert (serve_cfg.min_replicas, serve_cfg.max_replicas, serve_cfg.initial_replicas) == (1, 3, 2)
    assert serve_cfg.policy.policy_function == POLICY_FUNCTION
    assert serve_cfg.policy.policy_kwargs["target_queue_depth"] == 6
    # What the controller does with it: deserialize, build with the kwargs, call.
    policy = _resolve_policy_callable(serve_cfg.policy)
    assert policy.params == PolicyParams(**serve_cfg.policy.policy_kwargs)
    assert policy(ctx(requests=13, hi=3))[0] == 3


def test_policy_config_hook_matches_options() -> None:
    app = AppConfig.model_validate({"model": {"autoscaling": {"max_replicas": 2}}})
    assert policy_config(app) == autoscaling_options(app.model.autoscaling)["policy"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_builds_valid_options(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    for app in raw["applications"]:
        cfg = AppConfig.model_validate(app.get("args") or {}).model.autoscaling
        serve_cfg = ServeAutoscalingConfig(**autoscaling_options(cfg))
        assert serve_cfg.max_replicas == cfg.max_replicas


# ------------------------------------------------------------------ backlog probe


class _Ref:
    def __init__(self, value: Any, delay: float = 0.0) -> None:
        self.value, self.delay = value, delay

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Any:
        await asyncio.sleep(self.delay)
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class _Method:
    def __init__(self, actor: _FakeActor) -> None:
        self.actor = actor

    def remote(self) -> _Ref:
        return _Ref(self.actor.value, self.actor.delay)


class _FakeActor:
    def __init__(self) -> None:
        self.value: Any = 0
        self.delay = 0.0
        self.backlog = _Method(self)


def test_backlog_probe_reads_and_never_blocks() -> None:
    probe = BacklogProbe("jobs", timeout_s=0.2)
    actor = _FakeActor()
    probe._actor = actor

    async def scenario() -> list[Any]:
        actor.value = 42
        first = await probe.stats()
        actor.value, actor.delay = 7, 5.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow = await probe.read()
        waited = loop.time() - started
        actor.value, actor.delay = RuntimeError("actor died"), 0.0
        dead = await probe.read()
        return [first, slow, waited, dead, probe._actor]

    first, slow, waited, dead, handle = asyncio.run(scenario())
    assert first == {JOB_BACKLOG_METRIC: 42.0}
    assert slow == 42.0 and waited < 1.0  # timed out: last value, within the timeout
    assert dead == 42.0 and handle is None  # looked up again later


def test_backlog_probe_names_the_apps_job_actor() -> None:
    from serve_app.jobs.manager import NAMESPACE, manager_name

    app = AppConfig.model_validate({"name": "photoenhance-scale"})
    probe = BacklogProbe.for_app(app, timeout_s=0.5)
    assert (probe.actor_name, probe.namespace) == (manager_name(app), NAMESPACE)
    assert probe.timeout_s == 0.5


def test_backlog_probe_without_ray_reports_zero() -> None:
    probe = BacklogProbe("no-such-actor", timeout_s=0.5)
    assert asyncio.run(probe.stats()) == {JOB_BACKLOG_METRIC: 0.0}
