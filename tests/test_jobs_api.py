"""Jobs end to end: the dev application (session fixture), real requests, real files.

Inputs are small generated PNGs under ``<jobs.data_dir>/inputs`` (the folder HTTP jobs may
read from). The job actor is a real detached Ray actor; one test kills its process, one
stops the whole application and deploys it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import job_ended, noise_png, wait_job
from PIL import Image

from serve_app.config import AppConfig


def image_folder(data_dir: Path, name: str, count: int, start: int = 0) -> Path:
    folder = data_dir / "inputs" / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        (folder / f"img{i:04d}.png").write_bytes(noise_png(i, 32))
    return folder


def submit(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def manifest(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    r = http.get(f"/v1/jobs/{job_id}/manifest.jsonl")
    assert r.status_code == 200
    return [json.loads(line) for line in r.text.splitlines()]


def assert_exactly_once(records: list[dict[str, Any]], total: int) -> None:
    indices = [r["index"] for r in records]
    assert len(indices) == len(set(indices)), "an item was recorded twice"
    assert sorted(indices) == list(range(total)), "an item was lost"


# ---------------------------------------------------------------------- a big job, watched


def test_200_image_prefix_job_completes_once_with_live_events(
    http: httpx.Client, data_dir: Path
) -> None:
    folder = image_folder(data_dir, "batch200", 200)
    job = submit(http, input_prefix=str(folder), options={"upscale": 2, "face": False})
    assert job["state"] in ("queued", "running") and job["urls"]["events"]

    events = []
    with http.stream("GET", f"/v1/jobs/{job['job_id']}/events", timeout=180) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    # The stream ends with its `end` event (docs/SECURITY.md, "Event streams").
    assert events.pop() == {"reason": "finished"}
    assert events[-1]["state"] == "completed"
    done_counts = [e["done"] for e in events]
    assert done_counts == sorted(done_counts) and len(events) >= 3
    assert any(e["eta_s"] is not None for e in events if e["state"] == "running")

    snap = http.get(f"/v1/jobs/{job['job_id']}").json()
    assert snap["counts"] == {"pending": 0, "running": 0, "succeeded": 200, "failed": 0}
    records = manifest(http, job["job_id"])
    assert_exactly_once(records, 200)
    rec = records[0]
    assert rec["status"] == "succeeded" and rec["width"] == 64 and rec["attempts"] >= 1
    assert set(rec["timings"]) >= {"fetch", "enhance", "write", "total"}
    assert "output" not in rec and rec["source"] == str(folder / f"img{rec['index']:04d}.png")
    out = (data_dir / "jobs" / job["job_id"] / "outputs" / rec["name"]).read_bytes()
    assert hashlib.sha256(out).hexdigest() == rec["sha256"]

    listed = http.get("/v1/jobs").json()["jobs"]
    assert job["job_id"] in [j["job_id"] for j in listed]


# ---------------------------------------------------------------------- uploads


def test_upload_names_cannot_escape_and_results_stream(
    http: httpx.Client, data_dir: Path, tmp_path: Path
) -> None:
    names = ["../../escape.png", "..\\..\\win.png", "/etc/abs.png", "ok.png", ".hidden.png"]
    files = [("files", (n, noise_png(100 + i, 32), "image/png")) for i, n in enumerate(names)]
    r = http.post("/v1/jobs", files=files, data={"upscale": "2", "face": "false", "priority": "3"})
    assert r.status_code == 202, r.text
    job = r.json()
    job_id = job["job_id"]
    assert job["priority"] == 3 and job["total"] == 5
    assert wait_job(http, job_id, job_ended)["state"] == "completed"

    job_dir = data_dir / "jobs" / job_id
    for path in data_dir.parent.rglob("*"):
        if path.is_file() and any(k in path.name for k in ("escape", "win", "abs")):
            # In a job's folder: this job's, or an earlier run's when the suite repeats.
            assert data_dir / "jobs" in path.parents, f"{path} escaped the jobs folder"
    root = job_dir / "outputs"
    outputs = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    # Names kept, confined: "..", the root and drive letters dropped, no hidden file.
    assert outputs == ["_hidden.png", "escape.png", "etc/abs.png", "ok.png", "win.png"]

    items = http.get(f"/v1/jobs/{job_id}/items", params={"offset": 1, "limit": 2}).json()
    assert [i["index"] for i in items["items"]] == [1, 2] and items["total"] == 5
    one = http.get(f"/v1/jobs/{job_id}/items/3/result")
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(one.content)).size == (64, 64)

    z = http.get(f"/v1/jobs/{job_id}/results.zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    records = {r["name"]: r for r in manifest(http, job_id)}
    with zipfile.ZipFile(io.BytesIO(z.content)) as archive:
        assert sorted(archive.namelist()) == outputs
        for name in outputs:
            assert hashlib.sha256(archive.read(name)).hexdigest() == records[name]["sha256"]

    # A late WebSocket client gets the current (final) state, then the socket closes.
    from websockets.sync.client import connect

    ws_url = str(http.base_url).replace("http", "ws", 1).rstrip("/") + f"/v1/jobs/{job_id}/ws"
    with connect(ws_url, open_timeout=10) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["state"] == "completed" and first["counts"]["succeeded"] == 5


def test_items_and_manifest_say_where_the_faces_are(http: httpx.Client, images: Any) -> None:
    photo = images.photo("Blake_Lively.jpg", max_side=128)
    sync = http.post("/v1/enhance", params={"upscale": 2, "format": "png"}, content=photo)
    assert sync.status_code == 200, sync.text
    want = [[int(v) for v in b.split(",")] for b in sync.headers["x-face-boxes"].split()]
    assert len(want) == int(sync.headers["x-faces-restored"]) == 2

    files = [("files", ("face.jpg", photo, "image/jpeg")), ("files", ("flat.png", noise_png(7, 32), "image/png"))]
    r = http.post("/v1/jobs", files=files, data={"upscale": "2", "format": "png"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert wait_job(http, job_id, job_ended)["state"] == "completed"
    rows = http.get(f"/v1/jobs/{job_id}/items").json()["items"]
    # The same photo, options and weights: the same faces, in the same places.
    assert (rows[0]["faces"], rows[0]["face_boxes"]) == (2, want)
    records = {rec["index"]: rec for rec in manifest(http, job_id)}
    assert records[0]["face_boxes"] == want
    assert len(records[1]["face_boxes"]) == records[1]["faces"] == rows[1]["faces"]


def test_too_many_files_is_refused_and_leaves_nothing(
    http: httpx.Client, app_config: AppConfig, data_dir: Path
) -> None:
    before = set(os.listdir(data_dir / "jobs"))
    n = app_config.jobs.max_upload_files + 1
    files = [("files", (f"f{i}.png", b"x" * 10, "image/png")) for i in range(n)]
    r = http.post("/v1/jobs", files=files)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_many_files"
    assert set(os.listdir(data_dir / "jobs")) == before
    r = http.post("/v1/jobs", files=[("image", ("a.png", b"x", "image/png"))])
    assert r.status_code == 400


def test_bad_requests_are_clear_4xx(http: httpx.Client, data_dir: Path) -> None:
    cases = [
        ({"inputs": ["/etc/hosts"]}, 400, "forbidden_path"),
        ({"inputs": [str(data_dir / "inputs" / ".." / ".." / "x.png")]}, 400, "forbidden_path"),
        ({"inputs": []}, 400, "no_inputs"),
        ({"inputs": ["a"], "input_prefix": "b"}, 400, "no_inputs"),
        ({"inputs": ["ftp://x/y.png"]}, 400, "invalid_uri"),
        ({"input_prefix": str(data_dir / "inputs"), "output": "/tmp/elsewhere"}, 400,
         "forbidden_path"),
        ({"input_prefix": str(data_dir / "inputs"), "options": {"upscale": 3}}, 422,
         "invalid_option"),
        ({"input_prefix": str(data_dir / "inputs"), "priority": "high"}, 400, "invalid_request"),
        ({"input_prefix": str(data_dir / "inputs"), "colour": "red"}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        r = http.post("/v1/jobs", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == code, (body, r.text)
    unknown = "j20990101000000deadbeef"
    for method, path in [("GET", ""), ("GET", "/items"), ("GET", "/events"),
                         ("GET", "/results.zip"), ("GET", "/manifest.jsonl"),
                         ("POST", "/cancel"), ("GET", "/items/0/result")]:
        r = http.request(method, f"/v1/jobs/{unknown}{path}")
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "job_not_found"


def test_private_url_is_refused_before_anything_is_written(
    app_config: AppConfig, tmp_path: Path
) -> None:
    """With private addresses not allowed (the production default), a loopback URL is a 400
    at submission; checked by the route itself, before the job actor is involved."""
    from starlette.applications import Starlette

    from serve_app.api.errors import EXCEPTION_HANDLERS
    from serve_app.api.jobs import JobsApi, job_routes

    strict = app_config.model_copy(
        update={"jobs": app_config.jobs.model_copy(
            update={"allow_private_urls": False, "data_dir": tmp_path})}
    )
    app = Starlette(routes=job_routes(JobsApi(strict)), exception_handlers=EXCEPTION_HANDLERS)

    async def post_all() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for url in ["http://127.0.0.1:9/a.png", "http://localhost/a.png",
                        "http://169.254.169.254/latest/meta-data", "http://[::1]/a.png",
                        "http://10.0.0.1/a.png"]:
                body = {"inputs": ["https://8.8.8.8/ok.png", url]}
                r = await client.post("/v1/jobs", json=body)
                assert r.status_code == 400, r.text
                assert r.json()["error"]["code"] == "private_address"

    asyncio.run(post_all())
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_short_storage_is_a_507_before_the_job_exists(
    app_config: AppConfig, tmp_path: Path
) -> None:
    from starlette.applications import Starlette

    from serve_app.api.errors import EXCEPTION_HANDLERS
    from serve_app.api.jobs import JobsApi, job_routes

    short = app_config.model_copy(
        update={"jobs": app_config.jobs.model_copy(
            update={"min_free_bytes": 10**18, "data_dir": tmp_path})}
    )
    app = Starlette(routes=job_routes(JobsApi(short)), exception_handlers=EXCEPTION_HANDLERS)
    folder = image_folder(tmp_path, "few", 2)

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.post("/v1/jobs", json={"input_prefix": str(folder)}),
                await client.post("/v1/jobs", files=[("files", ("a.png", noise_png(1, 32), "image/png"))]),
            ]

    for r in asyncio.run(post_all()):
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage"
        assert "free" in r.json()["error"]["message"]
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


# ---------------------------------------------------------------------- failures and control


def test_bad_items_make_a_partial_job_with_codes(
    http: httpx.Client, data_dir: Path, shared_data: Path
) -> None:
    folder = image_folder(data_dir, "mixed", 3)
    bad = {}
    for name in ("not_an_image.png", "truncated.jpg", "empty.jpg"):
        target = folder / f"bad_{name}"
        target.write_bytes((shared_data / "bad" / name).read_bytes())
        bad[str(target)] = name
    inputs = [str(p) for p in sorted(folder.glob("img*.png"))] + list(bad)
    inputs.append(str(folder / "missing.png"))
    job = submit(http, inputs=inputs, options={"face": False})
    snap = wait_job(http, job["job_id"], job_ended)
    assert snap["state"] == "partial"
    assert snap["counts"]["succeeded"] == 3 and snap["counts"]["failed"] == 4
    failed = http.get(f"/v1/jobs/{job['job_id']}/items", params={"status": "failed"}).json()
    codes = {i["source"]: i["error"]["code"] for i in failed["items"]}
    assert codes[str(folder / "missing.png")] == "source_not_found"
    for source in bad:
        assert codes[source] in ("unsupported_media_type", "invalid_image", "empty_body"), codes
    records = manifest(http, job["job_id"])
    assert_exactly_once(records, len(inputs))
    assert all(r["attempts"] == 1 for r in records if r["status"] == "failed")
    r = http.get(f"/v1/jobs/{job['job_id']}/items/4/result")
    assert r.status_code == 404 and r.json()["error"]["code"] == "item_failed"


def test_pause_resume_cancel(http: httpx.Client, data_dir: Path) -> None:
    folder = image_folder(data_dir, "control", 60)
    job = submit(http, input_prefix=str(folder), max_inflight=1, options={"face": False})
    job_id = job["job_id"]
    wait_job(http, job_id, lambda s: s["done"] >= 2)

    r = http.post(f"/v1/jobs/{job_id}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused"
    assert http.post(f"/v1/jobs/{job_id}/pause").status_code == 409
    # The item in flight finishes; then nothing new starts (watched for a second).
    settled = wait_job(http, job_id, lambda s: s["counts"]["running"] == 0, timeout=60)["done"]
    time.sleep(1.0)
    assert http.get(f"/v1/jobs/{job_id}").json()["done"] == settled

    assert http.post(f"/v1/jobs/{job_id}/resume").json()["state"] == "running"
    wait_job(http, job_id, lambda s: s["done"] >= settled + 2)
    r = http.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    # Items in flight are cancelled, not waited for (tests/test_jobs_core.py proves it with
    # items that never return); here a generous deadline, not a timing.
    snap = wait_job(http, job_id, lambda s: s["counts"]["running"] == 0, timeout=60)
    assert snap["state"] == "cancelled" and snap["done"] < 60
    r = http.post(f"/v1/jobs/{job_id}/resume")
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"
    assert http.post(f"/v1/jobs/{job_id}/frobnicate").status_code == 404
    records = manifest(http, job_id)
    assert len({r["index"] for r in records}) == len(records)
    names = {r["name"] for r in records}
    assert {p.name for p in (data_dir / "jobs" / job_id / "outputs").iterdir()} <= names


# ---------------------------------------------------------------------- restarts


def _manager(app_config: AppConfig) -> Any:
    import ray

    from serve_app.jobs.manager import NAMESPACE, manager_name

    return ray.get_actor(manager_name(app_config), namespace=NAMESPACE)


def test_killed_job_actor_resumes_and_records_each_item_once(
    http: httpx.Client, app_config: AppConfig, data_dir: Path
) -> None:
    import ray

    folder = image_folder(data_dir, "killed", 80)
    job = submit(http, input_prefix=str(folder), max_inflight=2, options={"face": False})
    wait_job(http, job["job_id"], lambda s: s["done"] >= 10)
    pid = ray.get(_manager(app_config).pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)  # a real kill: Ray restarts the actor in a new process
    assert len(manifest_lines(data_dir, job["job_id"])) < 80, "the job ended before the kill"

    snap = wait_job(http, job["job_id"], job_ended, timeout=180)
    assert snap["state"] == "completed"
    assert ray.get(_manager(app_config).pid.remote(), timeout=30) != pid
    assert_exactly_once(manifest(http, job["job_id"]), 80)
    outputs = list((data_dir / "jobs" / job["job_id"] / "outputs").iterdir())
    assert len(outputs) == 80 and not [p for p in outputs if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_whole_server_restart_resumes_unfinished_jobs(
    http: httpx.Client, app_config: AppConfig, serve_args: dict[str, Any], data_dir: Path
) -> None:
    import ray
    from ray import serve

    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    folder = image_folder(data_dir, "restart", 60)
    job = submit(http, input_prefix=str(folder), options={"face": False})
    wait_job(http, job["job_id"], lambda s: s["done"] >= 5)

    # Stop everything that holds job state: the job actor for good, then the application.
    ray.kill(_manager(app_config), no_restart=True)
    serve.delete(APP_NAME)
    stopped = len(manifest_lines(data_dir, job["job_id"]))
    assert stopped < 60

    serve.run(build_app(serve_args), name=APP_NAME, route_prefix="/")
    snap = wait_job(http, job["job_id"], job_ended, timeout=180)
    assert snap["state"] == "completed"
    assert_exactly_once(manifest(http, job["job_id"]), 60)


def manifest_lines(data_dir: Path, job_id: str) -> list[str]:
    return (data_dir / "jobs" / job_id / "manifest.jsonl").read_text().splitlines()


# ---------------------------------------------------------------------- from a Ray job


def test_run_module_enhances_a_folder_and_resumes(
    http: httpx.Client, data_dir: Path, tmp_path: Path
) -> None:
    from serve_app.jobs import run_job
    from serve_app.options import resolve_options

    folder = image_folder(tmp_path, "src", 12)
    out = tmp_path / "out"
    options = resolve_options({"face": False, "upscale": 1})
    snap = asyncio.run(run_job(str(folder), str(out), options, concurrency=4))
    assert snap["state"] == "completed" and snap["total"] == 12
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 12

    # Lose the last records and a state mark, as a run killed mid-way would: a re-run
    # redoes just those.
    (out / "manifest.jsonl").write_text("\n".join(lines[:7]) + "\n")
    state = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({**state, "state": "running"}))
    snap = asyncio.run(run_job(str(folder), str(out), options, concurrency=4))
    assert snap["state"] == "completed"
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert_exactly_once(records, 12)
    assert [r["index"] for r in records[:7]] == [json.loads(x)["index"] for x in lines[:7]]


# ---------------------------------------------------------------------- the command line


def test_cli_submit_watch_status_download(
    serve_url: str, data_dir: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from serve_app.cli import main

    # A folder tree as a camera card leaves it: a subfolder whose names repeat the top's,
    # and files that are not photos (hidden, or not images), which are not sent.
    folder = tmp_path / "photos"
    (folder / "day2").mkdir(parents=True)
    for i in range(2):
        (folder / f"p{i}.png").write_bytes(noise_png(300 + i, 32))
        (folder / "day2" / f"p{i}.png").write_bytes(noise_png(310 + i, 32))
    (folder / ".hidden.png").write_bytes(noise_png(320, 32))
    (folder / "day2" / "notes.txt").write_text("not a photo")
    runner = CliRunner()
    env = {"PHOTOENHANCE_SERVER": serve_url}
    r = runner.invoke(main, ["job", "submit", str(folder), "--no-face", "--upscale", "1",
                             "--watch"], env=env)
    assert r.exit_code == 0, r.output
    job_id = r.output.splitlines()[0].strip()
    assert "completed" in r.output and "4/4 done" in r.output
    r = runner.invoke(main, ["job", "status", job_id], env=env)
    assert r.exit_code == 0 and "completed" in r.output
    out = tmp_path / "r.zip"
    r = runner.invoke(main, ["job", "download", job_id, "--out", str(out)], env=env)
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(out) as archive:
        # The tree is kept: two p0.png stay two.
        assert sorted(archive.namelist()) == ["day2/p0.png", "day2/p1.png", "p0.png", "p1.png"]
    r = runner.invoke(main, ["job", "cancel", job_id], env=env)
    assert r.exit_code == 1 and "invalid_state" in r.output
