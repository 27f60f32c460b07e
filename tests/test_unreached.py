"""The answers no ordinary request reaches, reached on purpose through a running application.

A second, tight application (``pe-tight`` at ``/tight``) is deployed into the session's Ray
beside the dev one: one request past the ingress's door, one waiting, a 1.5 s queue deadline
and a 4 s model deadline. A slow request (a 960 px image at x4 in 32 px tiles: well past
4 s of engine work on a quiet 2-core machine, where 900 px took 5.4 s and 640 px, once the
engine ran its tiles side by side, 3.0 s) holds the door, so the next ones are shed; killing its model replica gives ``replica_unavailable`` and
``not_ready``. Every answer is checked for status, code and ``Retry-After``. Its added-model
folder's path says "CUDA error", so a request naming its added model whose file is gone
fails with those words, as a broken device would (the fault's health-check replacement).
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import job_ended, noise_png, wait_job
from PIL import Image

from serve_app.client import wait_ready
from serve_app.engine import added

try:
    from _added_models import write_state
except ImportError:
    from tests._added_models import write_state

TIGHT_APP = "pe-tight"
FAULTY = "t-faulty"  # the tight app's added model (see tight_args)
ESTIMATE_ROOM = 272 * 2**20
SLOW = {"upscale": "4", "face": "false", "bg_model": "RealESRGAN_x4plus", "tile": "32"}
FAST = {"upscale": "1", "face": "false", "bg_model": "none"}


def until(condition: Callable[[], Any], timeout: float = 120.0, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()["error"]
    assert body["code"] == code, body
    return body


def retry_after(r: httpx.Response) -> int:
    value = r.headers["retry-after"]
    assert value.isdigit(), value
    return int(value)


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing"
    return float(match.group(1))


@pytest.fixture(scope="module")
def tight_args(serve_args: dict[str, Any], tmp_path_factory) -> dict[str, Any]:
    args = copy.deepcopy(serve_args)
    args["name"] = TIGHT_APP
    args["jobs"]["data_dir"] = str(tmp_path_factory.mktemp("tight"))
    args["model"].update(num_cpus=0, max_ongoing_requests=4, health_check_period_s=2)
    # The model replica may grow by 512 MiB after loading: the x4 canvas of a 2000 px image
    # (768 MB of float32; outputs up to 64 MP here) does not fit, the slow request's (177 MB)
    # does.
    # Pastes not overlapped (the CPU default; dev.yaml overlaps them): each batch runs whole
    # in one thread hop, the path whose abandonment and faults these tests reach.
    args["engine"] = {**args.get("engine", {}), "cpu_memory_mb": 512, "overlap_paste": False}
    args["limits"] = {**args["limits"], "max_output_pixels": 64_000_000}
    args["ingress"].update(num_cpus=0, max_inflight=1, max_queued_requests=1,
                           queue_timeout_s=1.5, request_timeout_s=4)
    # Free space that holds ESTIMATE_ROOM more bytes: a job estimated below it is accepted,
    # one above it is a 507 (margins of ~240 MB either way, against other writers' churn).
    free = shutil.disk_usage(args["jobs"]["data_dir"]).free
    args["jobs"]["min_free_bytes"] = max(0, free - ESTIMATE_ROOM)
    # Added models of its own, in a folder whose path holds the words torch uses for a broken
    # device: loading one whose file is gone raises FileNotFoundError naming that path, which
    # the engine takes for a CUDA fault (Engine.fault), reachable on a CPU by a real request.
    faulty = tmp_path_factory.mktemp("faulty") / "CUDA error"
    faulty.mkdir()
    added.add([write_state("ESRGAN", tmp_path_factory.mktemp("src"))], str(faulty), FAULTY)
    args["weights"] = {**args["weights"], "added": str(faulty)}
    return args


@pytest.fixture(scope="module")
def tight(serve_url: str, tight_args: dict[str, Any]) -> Iterator[str]:
    from ray import serve

    from serve_app.deployments.app import build_app

    serve.run(build_app(tight_args), name=TIGHT_APP, route_prefix="/tight")
    url = f"{serve_url}/tight"
    wait_ready(url, 300)
    try:
        yield url
    finally:
        serve.delete(TIGHT_APP)


def _door(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return gauge(text, "photoenhance_door_active"), gauge(text, "photoenhance_door_waiting")


def _post(url: str, data: bytes, params: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/enhance", params=params, content=data, timeout=300)


def test_full_queue_queue_deadline_and_model_deadline_are_503s(tight: str) -> None:
    slow_image, small = noise_png(1, 960, 960), noise_png(2, 16, 16)
    with ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        slow = pool.submit(_post, tight, slow_image, SLOW)
        until(lambda: _door(tight) == (1.0, 0.0))
        queued_at = time.monotonic()
        queued = pool.submit(_post, tight, small, FAST)
        until(lambda: _door(tight) == (1.0, 1.0))

        # The waiting room (one place) is taken: shed at once, before any work.
        refused = _post(tight, small, FAST)
        body = error_of(refused, 503, "overloaded")
        assert "queue is full" in body["message"]
        assert retry_after(refused) >= 1

        # The waiting one passes its 1.5 s deadline while the slow one still holds the door.
        r = queued.result()
        waited = time.monotonic() - queued_at
        body = error_of(r, 503, "overloaded")
        assert "waited 1.5s" in body["message"] and retry_after(r) >= 1
        assert waited >= 1.5

        # The slow one runs into the 4 s model deadline.
        r = slow.result()
        error_of(r, 503, "timeout")
        assert retry_after(r) == 5
        assert time.monotonic() - started >= 4.0
    until(lambda: _door(tight) == (0.0, 0.0))
    # Its caller gone, the model replica stopped its tiles rather than finish them for no one
    # (counted by outcome on Ray's metrics port, exported every 10 s).
    until(lambda: _images_abandoned(TIGHT_APP) >= 1, timeout=120, every=1.0)


def _images_abandoned(app: str) -> float:
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = ray._private.worker.global_worker.node
    text = httpx.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "ray_photoenhance_images_total"
               and s.labels.get("application") == app and s.labels.get("outcome") == "abandoned")


def _replica_actor(app: str, deployment: str) -> Any:
    import ray
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"][deployment]["replicas"]
    running = [r for r in replicas if r["state"] == "RUNNING"]
    assert len(running) == 1, replicas
    return ray.get_actor(running[0]["actor_name"], namespace="serve"), running[0]["replica_id"]


def test_a_killed_model_replica_is_replica_unavailable_then_not_ready(tight: str) -> None:
    import ray

    until(lambda: _door(tight) == (0.0, 0.0))
    wait_ready(tight, 300)
    actor, replica_id = _replica_actor(TIGHT_APP, "Enhancer")
    with ThreadPoolExecutor(2) as pool:
        # A request that takes seconds (2 s on a quiet 2-core machine), in the model when the
        # replica dies.
        slow = pool.submit(_post, tight, noise_png(3, 512, 512), SLOW)
        # In the model replica (its own count, as the autoscaling policy reads it): the
        # engine's seconds of 32 px tiles are most of the call, so the kill lands mid-work,
        # well inside the 4 s deadline.
        until(lambda: _model_in_flight(TIGHT_APP) == 1.0)
        ray.kill(actor, no_restart=True)
        r = slow.result()
    error_of(r, 503, "replica_unavailable")
    assert retry_after(r) == 1

    # Until Serve has started a new replica, the application says it is not ready.
    seen = until(lambda: _not_ready(tight), timeout=120, every=0.1)
    assert retry_after(seen) == 5
    wait_ready(tight, 300)
    assert _replica_actor(TIGHT_APP, "Enhancer")[1] != replica_id
    ok = _post(tight, noise_png(4, 16, 16), FAST)
    assert ok.status_code == 200, ok.text


def _model_in_flight(app: str) -> float:
    from ray import serve

    handle = serve.get_deployment_handle("Enhancer", app)
    return float(handle.record_autoscaling_stats.remote().result(timeout_s=60)["in_flight"])


def test_a_faulted_engine_fails_its_health_check_and_its_replica_is_replaced(
    tight: str, tight_args: dict[str, Any]
) -> None:
    """A device fault (``Engine.fault``) is a generic 500 for its request; the replica's
    health check then fails, Serve replaces it (``started_at`` moves, read over HTTP) and the
    application serves again."""
    wait_ready(tight, 300)
    before = httpx.get(f"{tight}/v1/models", timeout=60).json()["engine"]["started_at"]
    location = Path(tight_args["weights"]["added"])
    (location / _added_record(location).file).unlink(missing_ok=True)
    r = _post(tight, noise_png(6, 16, 16), {**FAST, "bg_model": FAULTY, "upscale": "2"})
    body = error_of(r, 500, "engine_error")
    assert body["message"] == "the engine failed on this image"
    assert str(location) not in r.text and "CUDA" not in r.text

    # Its health check fails (every 2 s here) and Serve starts another replica.
    def replaced() -> bool:
        r = httpx.get(f"{tight}/v1/models", timeout=60)
        # No engine facts while no replica runs (the old one is gone, the new one starting).
        engine = r.json()["engine"] if r.status_code == 200 else None
        return engine is not None and engine["started_at"] != before

    until(replaced, timeout=300, every=0.5)
    wait_ready(tight, 300)
    ok = _post(tight, noise_png(7, 16, 16), FAST)
    assert ok.status_code == 200, ok.text
    assert ok.content[:8] == b"\x89PNG\r\n\x1a\n"


def _added_record(location: Path) -> Any:
    from serve_app.engine import catalog

    return catalog.read(str(location))[FAULTY]


def _not_ready(url: str) -> httpx.Response | None:
    r = httpx.get(f"{url}/readyz", timeout=60)
    if r.status_code == 503 and r.json()["error"]["code"] == "not_ready":
        return r
    return None


def test_an_unexpected_fault_is_a_generic_500(tight: str, tight_args: dict[str, Any]) -> None:
    """A real fault on disk (the presets lock file is a folder) is a logged 500 whose answer
    says nothing of paths or exceptions."""
    data_dir = Path(tight_args["jobs"]["data_dir"])
    lock = data_dir / "presets.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    try:
        r = httpx.put(f"{tight}/v1/presets/p1", json={"upscale": 2}, timeout=60)
        body = error_of(r, 500, "internal_error")
        assert body == {"code": "internal_error", "message": "internal server error"}
        assert str(data_dir) not in r.text and "Error" not in r.text
    finally:
        lock.rmdir()
    r = httpx.put(f"{tight}/v1/presets/p1", json={"upscale": 2}, timeout=60)
    assert r.status_code == 201, r.text


def test_an_image_too_large_for_the_device_is_413_alone(tight: str) -> None:
    """The CPU allocator refusing (the replica's memory cap) is the image's size: a 413 with
    its code, the replica stays, and the next request succeeds on it."""
    wait_ready(tight, 300)
    _, replica_id = _replica_actor(TIGHT_APP, "Enhancer")
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), (90, 120, 150)).save(buf, "PNG")
    r = _post(tight, buf.getvalue(), {**SLOW, "tile": "512"})
    body = error_of(r, 413, "too_large_for_device")
    assert "alloc" not in body["message"] and "/" not in body["message"]
    ok = _post(tight, noise_png(5, 64, 64), {**SLOW, "upscale": "2"})
    assert ok.status_code == 200, ok.text
    assert _replica_actor(TIGHT_APP, "Enhancer")[1] == replica_id


def test_507_follows_the_estimated_output_size(tight: str, tight_args: dict[str, Any]) -> None:
    """The same inputs: at x1 (about 32 MB of output estimated) the job fits the room left
    above ``min_free_bytes``; at x4 (16 times that) it is refused before it exists."""
    folder = Path(tight_args["jobs"]["data_dir"]) / "inputs" / "big"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(4):  # incompressible: each PNG is ~8 MB on disk
        Image.fromarray(rng.integers(0, 255, (1600, 1700, 3), dtype=np.uint8)).save(
            folder / f"big{i}.png", compress_level=0)
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert 16 * total > ESTIMATE_ROOM + 200 * 2**20 and total < ESTIMATE_ROOM - 200 * 2**20
    jobs_dir = Path(tight_args["jobs"]["data_dir"]) / "jobs"
    before = set(jobs_dir.iterdir()) if jobs_dir.exists() else set()

    body = {"input_prefix": str(folder), "options": {"upscale": 4, "face": False}}
    r = httpx.post(f"{tight}/v1/jobs", json=body, timeout=120)
    error_of(r, 507, "insufficient_storage")
    assert (set(jobs_dir.iterdir()) if jobs_dir.exists() else set()) == before

    body["options"] = {"upscale": 1, "face": False, "bg_model": "none"}
    r = httpx.post(f"{tight}/v1/jobs", json=body, timeout=120)
    assert r.status_code == 202, r.text  # accepted: its estimate fits
    job_id = r.json()["job_id"]
    # Its items are not the point (the tight app's 4 s model deadline may cut big ones).
    # Cancelled at once: its four 2.7 MP items (8 MB PNGs to read and decode) cannot all be
    # done within this request's round trip, so the job is still queued or running.
    cancel = httpx.post(f"{tight}/v1/jobs/{job_id}/cancel", timeout=60)
    assert cancel.status_code == 200 and cancel.json()["state"] == "cancelled", cancel.text
    snap = until(lambda: _finished(tight, job_id), timeout=300, every=0.5)
    assert snap["state"] == "cancelled"


def _finished(url: str, job_id: str) -> dict[str, Any] | None:
    snap = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
    return snap if snap["state"] in ("completed", "partial", "failed", "cancelled") else None


# ---------------------------------------------------------------------- on the dev application


def test_broken_multipart_is_400_bad_request(http: httpx.Client) -> None:
    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    nameless = (b'--XyZ\r\nContent-Disposition: form-data; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--XyZ--\r\n")
    body = error_of(http.post("/v1/enhance", content=nameless, headers=headers), 400,
                    "bad_request")
    assert "name" in body["message"]


def test_an_upload_over_the_byte_limit_is_file_too_large(
    http: httpx.Client, app_config: Any
) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (app_config.limits.max_bytes + 1)
    r = http.post("/v1/jobs", files=[("files", ("big.png", big, "image/png"))])
    body = error_of(r, 413, "file_too_large")
    assert "big.png" in body["message"] or "limit" in body["message"]


def test_results_zip_of_a_partial_job_and_a_failed_job(
    http: httpx.Client, shared_data: Path
) -> None:
    import zipfile

    good = [("files", (f"ok{i}.png", noise_png(10 + i, 20, 20), "image/png")) for i in range(3)]
    bad = [("files", ("broken.jpg", (shared_data / "bad" / "truncated.jpg").read_bytes(),
                      "image/jpeg"))]
    r = http.post("/v1/jobs", files=good + bad, data={"face": "false", "upscale": "1"})
    assert r.status_code == 202, r.text
    snap = wait_job(http, r.json()["job_id"], job_ended)
    assert snap["state"] == "partial" and snap["counts"]["failed"] == 1
    z = http.get(f"/v1/jobs/{snap['job_id']}/results.zip")
    assert z.status_code == 200
    with zipfile.ZipFile(io.BytesIO(z.content)) as archive:
        names = sorted(archive.namelist())
    assert len(names) == 3 and all(n.endswith(("ok0.png", "ok1.png", "ok2.png")) for n in names)

    r = http.post("/v1/jobs", files=bad, data={"face": "false"})
    snap = wait_job(http, r.json()["job_id"], job_ended)
    assert snap["state"] == "failed"
    assert snap["counts"] == {"pending": 0, "running": 0, "succeeded": 0, "failed": 1}
    items = http.get(f"/v1/jobs/{snap['job_id']}/items").json()["items"]
    assert items[0]["error"]["code"] == "invalid_image"


def test_websocket_progress_is_live_and_throttled(http: httpx.Client, app_config: Any) -> None:
    from websockets.sync.client import connect

    folder = Path(app_config.jobs.data_dir) / "inputs" / "ws-live"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (folder / f"i{i:03d}.png").write_bytes(noise_png(200 + i, 24, 24))
    r = http.post("/v1/jobs", json={"input_prefix": str(folder), "max_inflight": 1,
                                    "options": {"face": False, "upscale": 1}})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    ws_url = str(http.base_url).replace("http", "ws", 1).rstrip("/") + f"/v1/jobs/{job_id}/ws"
    messages: list[tuple[float, dict[str, Any]]] = []
    with connect(ws_url, open_timeout=30) as ws:
        for raw in ws:
            message = json.loads(raw)
            if "state" in message:  # snapshots; the stream ends with {"event": "end", ...}
                # The server's send time, not this client's receive time (which a slow
                # reader or a busy machine bunches up or spreads out).
                messages.append((message["sent_at"], message))
    states = [m["state"] for _, m in messages]
    assert states[-1] == "completed" and messages[-1][1]["done"] == 40
    running = [(t, m) for t, m in messages if m["state"] == "running"]
    assert len(running) >= 3, states  # live: progress while it runs, not only the end
    dones = [m["done"] for _, m in running]
    assert dones == sorted(dones) and dones[0] < 40
    # Counts move many times a second; messages about them come at most every 500 ms (the
    # server waits that long for a state change before it sends counts). The stamps are wall
    # clock: NTP may slew it by 0.05 %, well inside the 10 ms allowed here.
    gaps = [b[0] - a[0] for a, b in zip(running, running[1:], strict=False)]
    assert min(gaps) >= 0.49, gaps


def test_micro_batches_of_several_images_form_in_the_server(http: httpx.Client) -> None:
    """Concurrent requests share engine batches: Ray's metrics port shows batches of more than
    one image (``ray_photoenhance_batch_size``), read before and after in this test."""
    before = _settled_batch_counts()
    data = [noise_png(300 + i, 32, 32) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(
            lambda d: http.post("/v1/enhance", params={"face": "false", "upscale": "2"},
                                content=d), data))
    assert [a.status_code for a in answers] == [200] * 12
    until(lambda: _moved(before, 1), timeout=120, every=1.0)
    after = _settled_batch_counts()
    batches = after["batches"] - before["batches"]
    assert after["multi"] > before["multi"], (before, after)
    assert 1 <= batches < 12, (before, after)  # 12 images in fewer than 12 batches


def _batch_counts() -> dict[str, float]:
    """From Ray's metrics port (the dev application's replicas): engine batches, and those of
    more than one image (the count less the ``le="1.0"`` bucket)."""
    import ray

    node = ray._private.worker.global_worker.node
    text = httpx.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=30).text
    out = {"batches": 0.0, "single": 0.0}
    for line in text.splitlines():
        if 'application="photoenhance"' not in line:
            continue
        if line.startswith("ray_photoenhance_batch_size_count"):
            out["batches"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_photoenhance_batch_size_bucket") and 'le="1.0"' in line:
            out["single"] += float(line.rsplit(" ", 1)[1])
    assert "ray_photoenhance_images_total" in text and "ray_photoenhance_batch_pixels" in text
    return {"batches": out["batches"], "multi": out["batches"] - out["single"]}


def _settled_batch_counts() -> dict[str, float]:
    """Counts that stayed the same across Ray's export interval (10 s): earlier requests'
    batches are in them, so the difference after is this test's own."""
    last = _batch_counts()
    deadline = time.monotonic() + 120
    while True:
        time.sleep(12)
        now = _batch_counts()
        if now == last:
            return now
        assert time.monotonic() < deadline, "batch counts never settled"
        last = now


def _moved(before: dict[str, float], at_least: float) -> dict[str, float] | None:
    now = _batch_counts()
    return now if now["batches"] - before["batches"] >= at_least else None
