"""Hostile job requests against the dev application: each a real request, each answered with
its documented status and code (docs/SECURITY.md, "Jobs and storage"), the server still
serving good jobs beside them.

Loopback sources need ``jobs.allow_private_urls`` (configs/dev.yaml sets it).
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TERMINAL, job_ended, noise_png, wait_job

from serve_app.config import AppConfig


@pytest.fixture(scope="module")
def inputs(data_dir: Path) -> Path:
    folder = data_dir / "inputs" / "hostile"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(noise_png(i))
    return folder


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code, r.text
    assert "Traceback" not in r.text


# ---------------------------------------------------------------------- a loopback source


class Source(BaseHTTPRequestHandler):
    """``/ok.png`` an image; ``/br`` and ``/gzip`` encoded bombs (made at import time,
    sent whatever the client asks for)."""

    raw = zlib_bomb = br_bomb = b""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/ok.png":
            body, encoding = self.raw, None
        elif self.path == "/br":
            body, encoding = self.br_bomb, "br"
        elif self.path == "/gzip":
            body, encoding = self.zlib_bomb, "gzip"
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def source() -> Iterator[str]:
    import brotli

    zeros = bytes(64 * 1024 * 1024)  # 64 MiB: far past the dev limit of 10 MiB once decoded
    Source.raw = noise_png(7)
    Source.br_bomb = brotli.compress(zeros, quality=5)
    Source.zlib_bomb = gzip.compress(zeros, compresslevel=9)
    assert len(Source.br_bomb) < 4096 and len(Source.zlib_bomb) < 128 * 1024
    server = ThreadingHTTPServer(("127.0.0.1", 0), Source)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ---------------------------------------------------------------------- the gate


def test_paths_and_uris_outside_the_gate_are_4xx(
    http: httpx.Client, data_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    ok = str(inputs / "img0.png")
    links = data_dir / "inputs" / "links"
    links.mkdir(parents=True, exist_ok=True)
    (links / "outside.png").unlink(missing_ok=True)
    (links / "outside.png").symlink_to("/etc/hostname")
    other = http.post("/v1/jobs", files=[("files", ("mine.png", noise_png(1), "image/png"))])
    assert other.status_code == 202, other.text
    other_id = other.json()["job_id"]
    wait_job(http, other_id, job_ended)
    other_dir = data_dir / "jobs" / other_id
    cases: list[tuple[dict[str, Any], int, str]] = [
        # outputs: aliases, chains, other protocols, outside the roots, another job's folder
        ({"inputs": [ok], "output": "local:///tmp/pe-out"}, 400, "invalid_output"),
        ({"inputs": [ok], "output": "memory://pe-out"}, 400, "invalid_output"),
        ({"inputs": [ok], "output": "dir::file:///tmp/pe-out"}, 400, "invalid_uri"),
        ({"inputs": [ok], "output": "simplecache::s3://bucket/out"}, 400, "invalid_uri"),
        ({"inputs": [ok], "output": "http://127.0.0.1:9/put"}, 400, "invalid_output"),
        ({"inputs": [ok], "output": "ftp://127.0.0.1/out"}, 400, "invalid_output"),
        ({"inputs": [ok], "output": "file:///tmp/pe-out"}, 400, "forbidden_path"),
        ({"inputs": [ok], "output": "file://otherhost/tmp/pe-out"}, 400, "invalid_uri"),
        ({"inputs": [ok], "output": "/tmp/pe-out"}, 400, "forbidden_path"),
        ({"inputs": [ok], "output": "relative/out"}, 400, "invalid_uri"),
        ({"inputs": [ok], "output": str(data_dir / "outputs" / ".." / "x")}, 400,
         "forbidden_path"),
        ({"inputs": [ok], "output": str(other_dir / "outputs")}, 400, "forbidden_path"),
        ({"inputs": [ok], "output": "s3://not-configured/out"}, 400, "forbidden_path"),
        ({"inputs": [ok], "output": "gs://not-configured/out"}, 400, "forbidden_path"),
        ({"inputs": [ok], "output": str(data_dir / "outputs" / "a\x00b")}, 400, "invalid_uri"),
        # inputs: others' uploads, the jobs folder, symlinks out, NUL, aliases, buckets
        ({"inputs": [str(next((other_dir / "inputs").iterdir()))]}, 400, "forbidden_path"),
        ({"input_prefix": str(data_dir / "jobs")}, 400, "forbidden_path"),
        ({"input_prefix": str(other_dir)}, 400, "forbidden_path"),
        ({"inputs": [str(links / "outside.png")]}, 400, "forbidden_path"),
        ({"inputs": [str(inputs / "a\x00.png")]}, 400, "invalid_uri"),
        ({"inputs": ["local://" + ok]}, 400, "invalid_uri"),
        ({"inputs": ["memory://x.png"]}, 400, "invalid_uri"),
        ({"inputs": ["dir::file://" + ok]}, 400, "invalid_uri"),
        ({"inputs": ["gcs://bucket/x.png"]}, 400, "invalid_uri"),
        ({"inputs": ["s3a://bucket/x.png"]}, 400, "invalid_uri"),
        ({"inputs": ["s3://not-configured/x.png"]}, 400, "forbidden_path"),
        ({"inputs": ["~/x.png"]}, 400, "invalid_uri"),
        ({"inputs": [42]}, 400, "no_inputs"),
        # URLs that do not parse, or carry credentials
        ({"inputs": ["http://127.0.0.1:99999/x.png"]}, 400, "invalid_uri"),
        ({"inputs": ["http://[::1/x.png"]}, 400, "invalid_uri"),
        ({"inputs": ["http://[not-v6]/x.png"]}, 400, "invalid_uri"),
        ({"inputs": [f"http://{'a' * 64}.example.com/x.png"]}, 400, "invalid_uri"),
        ({"inputs": ["http://user:pw@example.com/x.png"]}, 400, "invalid_uri"),
        ({"inputs": ["http://exa\x00mple.com/x.png"]}, 400, "invalid_uri"),
        ({"input_prefix": "http://example.com/photos/"}, 400, "invalid_uri"),
    ]
    for body, status, code in cases:
        r = http.post("/v1/jobs", json=body)
        assert_error(r, status, code)
        assert str(data_dir) not in r.text, r.text
    assert not Path("/tmp/pe-out").exists()


def test_validating_connects_nowhere(http: httpx.Client, inputs: Path) -> None:
    """ftp://, sftp:// and the like are refused without a connection being tried."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        for body in [{"inputs": [f"ftp://127.0.0.1:{port}/x.png"]},
                     {"inputs": [f"sftp://127.0.0.1:{port}/x.png"]},
                     {"inputs": [str(inputs / "img0.png")], "output": f"ftp://127.0.0.1:{port}/o"},
                     {"input_prefix": f"ftp://127.0.0.1:{port}/"}]:
            assert_error(http.post("/v1/jobs", json=body), 400)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_numbers_that_are_not_integers_are_4xx(http: httpx.Client, inputs: Path) -> None:
    prefix = json.dumps(str(inputs))
    for raw in [f'{{"input_prefix": {prefix}, "priority": 1e999}}',
                f'{{"input_prefix": {prefix}, "priority": -1e999}}',
                f'{{"input_prefix": {prefix}, "priority": NaN}}',
                f'{{"input_prefix": {prefix}, "priority": 2.5}}',
                f'{{"input_prefix": {prefix}, "priority": true}}',
                f'{{"input_prefix": {prefix}, "priority": 100000}}',
                f'{{"input_prefix": {prefix}, "max_inflight": Infinity}}',
                f'{{"input_prefix": {prefix}, "max_inflight": 0}}',
                f'{{"input_prefix": {prefix}, "max_inflight": "{"9" * 5000}"}}']:
        r = http.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
        assert_error(r, 400, "invalid_request")
    r = http.post("/v1/jobs", files=[("files", ("a.png", noise_png(2), "image/png"))],
                  data={"priority": "1e999"})
    assert_error(r, 400, "invalid_request")
    r = http.post("/v1/jobs", files=[("files", ("a.png", noise_png(2), "image/png"))],
                  data={"options": "[" * 5000})
    assert_error(r, 422, "invalid_option")


# ---------------------------------------------------------------------- outputs


def test_two_jobs_cannot_share_a_live_output_folder(
    http: httpx.Client, data_dir: Path, inputs: Path
) -> None:
    shared = data_dir / "outputs" / "shared"
    many = data_dir / "inputs" / "many"
    many.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (many / f"m{i:02d}.png").write_bytes(noise_png(100 + i))
    first = http.post("/v1/jobs", json={"input_prefix": str(many), "output": str(shared),
                                        "max_inflight": 1, "options": {"face": False}})
    assert first.status_code == 202, first.text
    first_id = first.json()["job_id"]
    for output in [shared, shared / "sub", data_dir / "outputs"]:
        r = http.post("/v1/jobs", json={"input_prefix": str(inputs), "output": str(output)})
        if http.get(f"/v1/jobs/{first_id}").json()["state"] in TERMINAL:
            pytest.fail("the first job ended before the check; give it more items")
        assert_error(r, 409, "output_in_use")
    first_snap = wait_job(http, first_id, job_ended)
    assert first_snap["state"] == "completed" and first_snap["output"] == str(shared)
    before = {p.name: p.read_bytes() for p in shared.iterdir()}

    # Once the first has ended, the folder is free; names carry the job id, so the second
    # job's outputs sit beside the first's and replace none of them.
    second = http.post("/v1/jobs", json={"input_prefix": str(inputs), "output": str(shared),
                                         "options": {"face": False, "upscale": 1}})
    assert second.status_code == 202, second.text
    second_id = second.json()["job_id"]
    assert wait_job(http, second_id, job_ended)["state"] == "completed"
    after = {p.name: p.read_bytes() for p in shared.iterdir()}
    assert {k: after[k] for k in before} == before
    assert len(before) == 30 and len(after) == 33
    assert all(name.startswith((first_id, second_id)) for name in after)


# ---------------------------------------------------------------------- fetching


def test_encoded_bodies_are_refused_not_inflated(
    http: httpx.Client, source: str
) -> None:
    r = http.post("/v1/jobs", json={"inputs": [f"{source}/ok.png", f"{source}/br",
                                               f"{source}/gzip"], "options": {"face": False}})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    snap = wait_job(http, job_id, job_ended)
    assert snap["state"] == "partial", snap
    items = {i["index"]: i for i in http.get(f"/v1/jobs/{job_id}/items").json()["items"]}
    assert items[0]["status"] == "succeeded"
    for index in (1, 2):
        assert items[index]["error"]["code"] == "content_encoding_refused", items[index]
        assert items[index]["attempts"] == 1


# ---------------------------------------------------------------------- answers


def test_answers_carry_no_server_paths(http: httpx.Client, data_dir: Path) -> None:
    r = http.post("/v1/jobs", files=[("files", ("../../holiday.png", noise_png(3), "image/png"))],
                  data={"face": "false"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    snap = wait_job(http, job_id, job_ended)
    assert snap["output"] is None and snap["owner"] is None
    listed = [j for j in http.get("/v1/jobs").json()["jobs"] if j["job_id"] == job_id]
    texts = [json.dumps(snap), http.get(f"/v1/jobs/{job_id}/items").text,
             http.get(f"/v1/jobs/{job_id}/manifest.jsonl").text, json.dumps(listed)]
    for text in texts:
        assert str(data_dir) not in text and "/tmp/" not in text, text
    item = http.get(f"/v1/jobs/{job_id}/items").json()["items"][0]
    assert item["source"] == "../../holiday.png" and item["name"] == "holiday.png"


def test_delete_removes_a_job_and_its_folder(
    http: httpx.Client, data_dir: Path, inputs: Path
) -> None:
    r = http.post("/v1/jobs", json={"input_prefix": str(inputs), "options": {"face": False}})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    r = http.delete(f"/v1/jobs/{job_id}")  # running or not: cancelled, then removed
    assert r.status_code == 204, r.text
    assert_error(http.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
    assert not (data_dir / "jobs" / job_id).exists()
    assert_error(http.delete(f"/v1/jobs/{job_id}"), 404, "job_not_found")
    assert_error(http.delete("/v1/jobs/..%2F..%2Fetc"), 404)
    assert job_id not in [j["job_id"] for j in http.get("/v1/jobs").json()["jobs"]]
    # The server still serves.
    r = http.post("/v1/jobs", json={"inputs": [str(inputs / "img1.png")],
                                    "options": {"face": False}})
    assert r.status_code == 202 and wait_job(http, r.json()["job_id"], job_ended)["state"] == "completed"


# ---------------------------------------------------------------------- callbacks


class Receiver(BaseHTTPRequestHandler):
    """Takes callbacks; answers 503 to the first delivery attempt, 200 after."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(503 if len(Receiver.received) == 1 else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_job_calls_back_signed_and_retried(
    http: httpx.Client, app_config: AppConfig, inputs: Path
) -> None:
    from serve_app.jobs.webhooks import secret_for, verify

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        for bad in ["http://127.0.0.1:99999/hook", "ftp://127.0.0.1/hook", "not a url",
                    "http://[::1/hook", "http://a\x00b/hook"]:
            r = http.post("/v1/jobs", json={"inputs": [str(inputs / "img0.png")],
                                            "callback_url": bad})
            assert_error(r, 400, "invalid_uri")
        r = http.post("/v1/jobs", json={"inputs": [str(inputs / "img0.png")],
                                        "options": {"face": False}, "callback_url": url})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["callback"] == {"url": url, "state": "pending", "attempts": 0}
        snap = wait_job(http, job_id, lambda s: (s["callback"] or {}).get("state") == "delivered")
        assert snap["state"] == "completed"
        assert snap["callback"]["attempts"] == 2 and snap["callback"]["status"] == 200
    finally:
        server.shutdown()
    assert len(Receiver.received) == 2
    headers, body = Receiver.received[-1]
    secret = secret_for(app_config.jobs, None)
    assert verify(secret, headers["x-photoenhance-timestamp"], body,
                  headers["x-photoenhance-signature"])
    assert not verify(b"another secret", headers["x-photoenhance-timestamp"], body,
                      headers["x-photoenhance-signature"])
    assert not verify(secret, headers["x-photoenhance-timestamp"], body + b" ",
                      headers["x-photoenhance-signature"])
    payload = json.loads(body)
    assert payload["job_id"] == job_id and payload["state"] == "completed"
    assert payload["counts"]["succeeded"] == 1 and payload["event"] == "job.ended"


def test_owners_see_only_their_jobs(
    http: httpx.Client, app_config: AppConfig, inputs: Path
) -> None:
    """The jobs boundary's owner contract (the API maps keys onto it: tests/test_keys.py):
    a job records its owner; reading or controlling it as another owner is "not found";
    owner None reads all."""
    import asyncio

    from serve_app.errors import NotFound
    from serve_app.jobs import JobIntake, JobReader

    intake, reader = JobIntake(app_config), JobReader(app_config)

    async def main() -> None:
        snap = await intake.submit({"inputs": [str(inputs / "img2.png")],
                                    "options": {"face": False}}, owner="alice")
        job_id = snap["job_id"]
        assert snap["owner"] == "alice"
        as_bob = [reader.get(job_id, owner="bob"),
                  reader.items(job_id, owner="bob"),
                  reader.manifest(job_id, owner="bob"),
                  reader.results(job_id, owner="bob"),
                  reader.item_result(job_id, 0, owner="bob"),
                  intake.control(job_id, "pause", owner="bob"),
                  intake.delete(job_id, owner="bob")]
        for call in as_bob:
            with pytest.raises(NotFound) as info:
                await call
            assert info.value.code == "job_not_found"
        assert job_id not in [j["job_id"] for j in await reader.list(owner="bob")]
        mine = await reader.list(owner="alice")
        assert mine and all(j["owner"] == "alice" for j in mine)
        assert (await reader.get(job_id, owner="alice"))["owner"] == "alice"
        assert job_id in [j["job_id"] for j in await reader.list(owner=None)]

    asyncio.run(main())


def test_private_callback_is_refused_when_not_allowed(
    app_config: AppConfig, tmp_path: Path
) -> None:
    import asyncio

    from starlette.applications import Starlette

    from serve_app.api.errors import EXCEPTION_HANDLERS
    from serve_app.api.jobs import JobsApi, job_routes

    strict = app_config.model_copy(update={"jobs": app_config.jobs.model_copy(
        update={"allow_private_urls": False, "data_dir": tmp_path})})
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a.png").write_bytes(noise_png(5))
    app = Starlette(routes=job_routes(JobsApi(strict)), exception_handlers=EXCEPTION_HANDLERS)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for hook in ["http://127.0.0.1:9/hook", "http://[::1]/hook",
                         "http://169.254.169.254/latest", "http://localhost/hook"]:
                r = await client.post("/v1/jobs", json={"inputs": [str(folder / "a.png")],
                                                        "callback_url": hook})
                assert_error(r, 400, "private_address")

    asyncio.run(main())
    jobs = tmp_path / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())


def test_an_uploads_source_is_served_as_uploaded_and_nothing_else(
    http: httpx.Client, inputs: Path, shared_data: Path
) -> None:
    """``GET .../items/{i}/source``: an upload's own bytes (the web page's original on any
    device), with a safe name; never another job kind's inputs, never past the list."""
    photo = (shared_data / "images" / "Adele_crop.png").read_bytes()
    jpeg = (shared_data / "bad" / "truncated.jpg").read_bytes()  # served as uploaded
    files = [("files", ("../../../etc/holiday photo.png", photo, "image/png")),
             ("files", ("b.jpg", jpeg, "image/jpeg"))]
    r = http.post("/v1/jobs", files=files, data={"face": "false", "upscale": "1"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    wait_job(http, job_id, job_ended)
    base = f"/v1/jobs/{job_id}/items"

    first = http.get(f"{base}/0/source")
    assert first.status_code == 200 and first.content == photo
    assert first.headers["content-type"] == "image/png"
    assert first.headers["content-length"] == str(len(photo))
    assert first.headers["content-disposition"] == 'inline; filename="000000_holiday_photo.png"'
    second = http.get(f"{base}/1/source")  # its item failed; its input is still the input
    assert second.status_code == 200 and second.content == jpeg
    assert second.headers["content-type"] == "image/jpeg"

    for index in ("2", "99999999999999999999999"):
        assert_error(http.get(f"{base}/{index}/source"), 404, "item_not_found")
    for path in (f"{base}/-1/source", f"{base}/x/source", f"{base}/0/source/x"):
        assert http.get(path).status_code == 404, path
    assert_error(http.get("/v1/jobs/j20250101120000a1b2c3d4/items/0/source"), 404,
                 "job_not_found")
    assert_error(http.get("/v1/jobs/..%2f..%2fetc/items/0/source"), 404, "not_found")

    # A job over the server's own files: its inputs are not served back.
    other = http.post("/v1/jobs", json={"input_prefix": str(inputs), "options": {"face": False}})
    assert other.status_code == 202, other.text
    assert_error(http.get(f"/v1/jobs/{other.json()['job_id']}/items/0/source"), 404,
                 "no_source")

