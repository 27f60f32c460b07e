"""Queue-depth autoscaling on the real application, CI-sized.

A second application (``photoenhance-scale`` at ``/scale``) is deployed next to the session's
dev app, from configs/dev.yaml with its model deployment autoscaling 1..2 on short delays and
short metric intervals (in Ray 2.60 ``metrics_interval_s`` alone sets how often figures are
pushed; no environment variable is needed).

- Interactive load: 1 -> 2 replicas within 45 s; back to 1 within downscale delay + 30 s after
  the load stops; no request fails except 503 (queue full).
- Job backlog alone (one item in flight at a time, so requests stay below the target): the
  backlog scales the deployment up, and the finished job lets it scale down.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = "photoenhance-scale"
PREFIX = "/scale"
# Generous: a replica start takes ~10 s on an idle 2-core machine and much longer on a busy
# one; the policy's own timing is tested with a fake clock in test_autoscaling_policy.py.
UPSCALE_WITHIN_S = 180.0
DOWNSCALE_WITHIN_S = 150.0
DOWNSCALE_DELAY_S = 5.0


def scaling_args(serve_args: dict[str, Any], tmp: Path) -> dict[str, Any]:
    args = copy.deepcopy(serve_args)
    args["name"] = APP
    args["jobs"] = {**args.get("jobs", {}), "data_dir": str(tmp / "jobs"),
                    "max_inflight": 1, "max_inflight_per_job": 1}
    args["model"] = {**args.get("model", {}), "autoscaling": {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_queue_depth": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": DOWNSCALE_DELAY_S,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    }}
    return args


@pytest.fixture(scope="module")
def scale_url(serve_url: str, serve_args: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.deployments.app import build_app

    args = scaling_args(serve_args, tmp_path_factory.mktemp("scale"))
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    try:
        yield serve_url + PREFIX
    finally:
        serve.delete(APP)


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["Enhancer"]
    return int(status.replica_states.get("RUNNING", 0))


class Load:
    """``workers`` threads posting small images to /v1/enhance until stopped."""

    def __init__(self, url: str, image: bytes, workers: int) -> None:
        self.url, self.image = url, image
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                try:
                    code = client.post(f"{self.url}/v1/enhance", content=self.image,
                                       headers={"Content-Type": "image/png"}).status_code
                except httpx.HTTPError:
                    code = 0
                with self._lock:
                    self.statuses[code] += 1


def test_interactive_load_scales_up_and_back(scale_url: str, images: Any) -> None:
    image = images.cv2_bytes(images.array(96, 128))
    assert wait_for(lambda: running_replicas() == 1, 60) is not None
    with Load(scale_url, image, workers=8) as load:
        up = wait_for(lambda: running_replicas() >= 2, UPSCALE_WITHIN_S)
    assert up is not None, f"still 1 replica after {UPSCALE_WITHIN_S}s; statuses {dict(load.statuses)}"
    down = wait_for(lambda: running_replicas() == 1, DOWNSCALE_DELAY_S + DOWNSCALE_WITHIN_S)
    assert down is not None, "did not return to 1 replica"
    assert load.statuses[200] > 0
    assert set(load.statuses) <= {200, 503}, dict(load.statuses)


def test_job_backlog_alone_scales_up_and_back(scale_url: str, images: Any) -> None:
    assert wait_for(lambda: running_replicas() == 1, DOWNSCALE_DELAY_S + 60) is not None
    files = [("files", (f"b{i:03d}.png", images.cv2_bytes(images.array(96, 128 + i)), "image/png"))
             for i in range(40)]
    with httpx.Client(base_url=scale_url, timeout=120) as client:
        response = client.post("/v1/jobs", files=files)
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        up = wait_for(lambda: running_replicas() >= 2, UPSCALE_WITHIN_S)
        assert up is not None, "a backlog of 40 items did not add a replica"

        def finished() -> bool:
            return client.get(f"/v1/jobs/{job_id}").json()["state"] in {"completed", "partial", "failed"}

        assert wait_for(finished, 300, every_s=1) is not None
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "completed"
    assert wait_for(lambda: running_replicas() == 1, DOWNSCALE_DELAY_S + DOWNSCALE_WITHIN_S) is not None
