"""Scale to zero, end to end: readiness means "can take a request".

A third application (``photoenhance-zero`` at ``/zero``) is deployed next to the session's dev
app, from configs/dev.yaml with its model deployment allowed to sleep: ``min_replicas: 0``,
``allow_scale_to_zero``, one replica at the start, short delays. Throughout, a thread polls
``/readyz``. The model goes to zero replicas by itself; a Kubernetes readiness probe at that
moment must keep the pod in its Service (200, the model's state ``scaled_to_zero``), and must
not itself wake the model; then one real image wakes it and is answered 200.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from conftest import wait_for

APP = "photoenhance-zero"
PREFIX = "/zero"
# Generous deadlines for a busy 2-core machine; the policy's timing is tested with a fake
# clock in test_autoscaling_policy.py.
TO_ZERO_WITHIN_S = 180.0
PROBE_AT_ZERO_S = 10.0  # ten of Serve's upscale delays: a wake would show


def zero_args(serve_args: dict[str, Any], tmp: Path) -> dict[str, Any]:
    args = copy.deepcopy(serve_args)
    args["name"] = APP
    args["jobs"] = {**args.get("jobs", {}), "data_dir": str(tmp / "jobs")}
    args["model"] = {**args.get("model", {}), "autoscaling": {
        "min_replicas": 0,
        "max_replicas": 1,
        "initial_replicas": 1,
        "allow_scale_to_zero": True,
        "target_queue_depth": 2,
        "upscale_delay_s": 1,
        # Long enough to see the woken replica running, short enough for CI.
        "downscale_delay_s": 15,
        "downscale_to_zero_delay_s": 15,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    }}
    return args


@pytest.fixture(scope="module")
def zero_url(serve_url: str, serve_args: dict[str, Any],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.deployments.app import build_app

    serve.run(build_app(zero_args(serve_args, tmp_path_factory.mktemp("zero"))),
              name=APP, route_prefix=PREFIX)
    try:
        yield serve_url + PREFIX
    finally:
        serve.delete(APP)


def replicas() -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[APP].deployments["Enhancer"]
    return {str(getattr(k, "value", k)): int(v) for k, v in status.replica_states.items()}


class Probe:
    """A readiness probe in a thread, as a kubelet runs one: GET /readyz every ``every_s``,
    each answer kept as (status, body)."""

    def __init__(self, url: str, every_s: float = 0.5) -> None:
        self.url, self.every_s = url, every_s
        self.seen: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                r = client.get(f"{self.url}/readyz")
                self.seen.append((r.status_code, r.json()))
                self._stop.wait(self.every_s)

    def states(self) -> list[str]:
        """The model states seen, consecutive repeats folded."""
        out: list[str] = []
        for _, body in self.seen:
            state = body.get("models", {}).get("enhancer", {}).get("state", "?")
            if not out or out[-1] != state:
                out.append(state)
        return out


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{url}/readyz", timeout=60)
    return r.status_code, r.json()


def state_of(url: str) -> str | None:
    return readyz(url)[1].get("models", {}).get("enhancer", {}).get("state")


def at_zero() -> bool:
    return sum(replicas().values()) == 0


@pytest.mark.slow
def test_ready_at_zero_and_woken_by_a_request(zero_url: str, images: Any) -> None:
    with Probe(zero_url) as probe:
        # Idle from the start: the policy takes the model to zero; probing does not stop it.
        assert wait_for(at_zero, TO_ZERO_WITHIN_S) is not None, f"never at zero: {replicas()}"
        assert wait_for(lambda: state_of(zero_url) == "scaled_to_zero", 30) is not None
        status, body = readyz(zero_url)
        assert status == 200 and body["ready"] is True and body["status"] == "ready"
        assert body["models"]["enhancer"] == {"state": "scaled_to_zero", "replicas": 0,
                                              "scale_to_zero": True}

        # Probing at zero wakes nothing, nor does a page or a monitor reading /v1/models.
        probed_from = len(probe.seen)
        deadline = time.monotonic() + PROBE_AT_ZERO_S
        while time.monotonic() < deadline:
            listing = httpx.get(f"{zero_url}/v1/models", timeout=60)
            assert listing.status_code == 200 and listing.json()["ready"] is True
            assert "RealESRGAN_x2plus" in listing.json()["models"]["background"]
            assert at_zero(), f"the probe or /v1/models woke the model: {replicas()}"
            time.sleep(0.5)
        assert len(probe.seen) - probed_from >= 5

        # A real request wakes it and is answered; a second one is warm.
        image = images.cv2_bytes(images.array(48, 64))
        timings = []
        for _ in range(2):
            t0 = time.monotonic()
            r = httpx.post(f"{zero_url}/v1/enhance", params={"upscale": 2, "face": "false"},
                           content=image, headers={"Content-Type": "image/png"}, timeout=300)
            timings.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            out = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
            assert out.shape == (96, 128, 3)
        assert wait_for(lambda: state_of(zero_url) == "running", 30, every_s=0.2) is not None
        status, body = readyz(zero_url)
        assert status == 200 and body["models"]["enhancer"]["replicas"] == 1

        # Asleep again: the answer keeps what the model last said (synthetic weights, profile).
        assert wait_for(at_zero, TO_ZERO_WITHIN_S) is not None, f"never at zero: {replicas()}"
        assert wait_for(lambda: state_of(zero_url) == "scaled_to_zero", 30) is not None
        status, body = readyz(zero_url)
        assert status == 200 and body["synthetic"] is True and body["model"]["profile"] == "tiny"
        assert response_header(zero_url) == "true"

    cold_s, warm_s = timings
    print(f"\nscale to zero: cold start {cold_s:.1f} s (48x64 px, x2: from zero replicas to "
          f"the answer), then warm {warm_s:.2f} s; /readyz states seen: "
          f"{' -> '.join(probe.states())}; {len(probe.seen)} probes")
    # Ready from first to last: the pod would never have left its Service.
    bad = [(code, body) for code, body in probe.seen if code != 200 or not body["ready"]]
    assert probe.seen and not bad, bad[:3]
    states = probe.states()
    assert {"scaled_to_zero", "running"} <= set(states) <= {"running", "scaled_to_zero",
                                                            "starting"}, states


def response_header(url: str) -> str | None:
    return httpx.get(f"{url}/readyz", timeout=60).headers.get("x-weights-synthetic")


@pytest.mark.parametrize(("status", "replica_states", "scale_to_zero", "state"), [
    ("HEALTHY", {"RUNNING": 2}, False, "running"),
    ("UNHEALTHY", {"RUNNING": 1, "STARTING": 1}, False, "running"),  # one still serves
    ("UPSCALING", {"STARTING": 1}, True, "starting"),  # woken by a request
    ("UPSCALING", {"STARTING": 1}, False, "starting"),  # first start: /readyz 503
    ("HEALTHY", {}, True, "scaled_to_zero"),
    ("DOWNSCALING", {"STOPPING": 1}, True, "scaled_to_zero"),  # a stopping replica serves none
    ("HEALTHY", {}, False, "unavailable"),
    ("UNHEALTHY", {"STARTING": 1}, True, "unavailable"),  # a crash, not the policy
    ("DEPLOY_FAILED", {}, True, "unavailable"),
])
def test_the_model_state_follows_serves_report(status: str, replica_states: dict[str, int],
                                               scale_to_zero: bool, state: str) -> None:
    from ray.serve._private.common import DeploymentStatus, ReplicaState

    from serve_app.deployments.ingress import classify

    assert classify(status, replica_states, scale_to_zero) == state
    # Serve's own enums, as serve.status() returns them, read the same.
    typed = {ReplicaState(k): v for k, v in replica_states.items()}
    assert classify(DeploymentStatus(status), typed, scale_to_zero) == state
