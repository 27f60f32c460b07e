"""Hostile requests at the HTTP edge (issue 17, items 4, 8 and 9), each beside a normal one.

- JSON job bodies: bounded in bytes (``jobs.max_json_bytes``) and in values
  (``jobs.max_json_inputs``), counted on the bytes before anything is parsed (413).
- Item indices of 5000 digits in a path: a bounded parse, not Python's int() limit (500).
- Multipart boundaries outside RFC 2046 (1-70 characters): 400 ``bad_request``, not the
  parser's own error escaping as a 500.
- Event streams: one key's share (``http.max_streams_per_key``, 429) below the global cap
  (503), against a keys-on application deployed beside the dev one.

``json_body_cases`` is also the list ``loadtests/hostile_cost.py`` measures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import job_ended, wait_job

from serve_app.auth import append_key
from serve_app.config import AppConfig

FAST = {"face": False, "bg_model": "none", "upscale": 1}
JSON = {"content-type": "application/json"}


def png(images: Any) -> bytes:
    return images.cv2_bytes(images.array(8, 8), ".png")


def error_of(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


# ----------------------------------------------------------------- JSON job bodies


def json_body_cases(config: AppConfig) -> list[tuple[str, dict[str, Any], int, str]]:
    """(name, httpx request kwargs for ``POST /v1/jobs``, status, code): JSON bodies that
    would cost the ingress far more memory than their bytes if they were parsed whole."""
    jobs = config.jobs
    limit, most = jobs.max_json_bytes, jobs.max_json_inputs

    class Chunked:  # sent without a Content-Length; iterable again for every send
        def __iter__(self) -> Iterator[bytes]:
            piece = b'"s3://b/k",' * 6000
            yield b'{"inputs": ['
            for _ in range(2 * limit // len(piece) + 1):
                yield piece

    lists = b"[],".join([b""] * (limit // 3 - 8))
    ones = b'"a",'.join([b""] * (limit // 4 - 8))
    uris = [f"s3://not-an-allowed-bucket/photos/{i:06d}.jpg" for i in range(most + 1)]
    return [
        # Refused from Content-Length before a byte is read (the 63 MiB body too:
        # loadtests/hostile_cost.py sends that one with urllib).
        ("JSON job: body over max_json_bytes", {"content": b" " * (limit + 1), "headers": JSON},
         413, "payload_too_large"),
        ("JSON job: body over max_json_bytes, chunked",
         {"content": Chunked(), "headers": JSON}, 413, "payload_too_large"),
        ("JSON job: max_json_bytes of [] (a list each 3 bytes)",
         {"content": b'{"inputs": [' + lists + b"[]]}", "headers": JSON}, 413, "too_many_inputs"),
        ('JSON job: max_json_bytes of "a"',
         {"content": b'{"inputs": [' + ones + b'"a"]}', "headers": JSON}, 413, "too_many_inputs"),
        ("JSON job: max_json_inputs + 1 inputs",
         {"content": json.dumps({"inputs": uris}).encode(), "headers": JSON},
         413, "too_many_inputs"),
        # Just inside both limits, with the widest characters (4 bytes a character in
        # Python): the most a body can cost once parsed. Refused by the storage gate.
        ("JSON job: widest characters, just inside the limits",
         {"content": _widest(limit, most), "headers": JSON}, 400, "invalid_uri"),
    ]


def _widest(limit: int, most: int) -> bytes:
    count = min(most, 60_000)
    size = (limit - 64) // count - 3  # bytes of each string's UTF-8
    item = "\U0001f600" + "x" * (size - 4)
    body = json.dumps({"inputs": [item] * count}, ensure_ascii=False,
                      separators=(",", ":")).encode()
    assert len(body) <= limit
    return body


@pytest.fixture(scope="module")
def prefix_folder(data_dir: Path, images: Any) -> Path:
    folder = data_dir / "inputs" / "http_hostile"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(png(images))
    return folder


@pytest.mark.parametrize("case", range(6))
def test_json_job_bodies_are_bounded_before_they_are_parsed(
    http, app_config, prefix_folder, case
):
    name, kwargs, status, code = json_body_cases(app_config)[case]
    r = http.post("/v1/jobs", **kwargs)
    assert error_of(r) == (status, code), (name, r.text[:300])
    if code in ("payload_too_large", "too_many_inputs"):
        # The answer says what to send instead.
        assert "input_prefix" in r.json()["error"]["message"]
    # A normal JSON job beside it is taken.
    good = http.post("/v1/jobs", json={"input_prefix": str(prefix_folder), "options": FAST})
    assert good.status_code == 202, good.text
    assert wait_job(http, good.json()["job_id"], job_ended)["state"] == "completed"


def test_json_job_at_exactly_max_json_inputs_is_counted_not_refused(http, app_config):
    """The count is exact: ``max_json_inputs`` inputs pass the bounds and reach the gate."""
    most = app_config.jobs.max_json_inputs
    uris = [f"s3://not-an-allowed-bucket/{i}.jpg" for i in range(most)]
    r = http.post("/v1/jobs", json={"inputs": uris, "options": FAST})
    assert error_of(r) == (400, "forbidden_path"), r.text[:300]


# ----------------------------------------------------------------- item indices


@pytest.fixture(scope="module")
def done_upload(http, images) -> str:
    files = [("files", (f"{i}.png", png(images), "image/png")) for i in range(2)]
    r = http.post("/v1/jobs", files=files, data={"options": json.dumps(FAST)})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert wait_job(http, job_id, job_ended)["state"] == "completed"
    return job_id


@pytest.mark.parametrize("route, code", [("result", "result_not_ready"),
                                         ("source", "item_not_found")])
@pytest.mark.parametrize("index", ["9" * 5000, "1" + "0" * 4300, "99999999999"])
def test_an_item_index_past_any_int_is_404_not_500(http, done_upload, route, code, index):
    r = http.get(f"/v1/jobs/{done_upload}/items/{index}/{route}")
    assert error_of(r) == (404, code), r.text[:300]
    # Beside it, item 1 (leading zeros are the same index) is served.
    good = http.get(f"/v1/jobs/{done_upload}/items/0001/{route}")
    assert good.status_code == 200 and good.content[:4] == b"\x89PNG"


def test_an_item_index_of_another_job_stays_job_not_found(http):
    r = http.get(f"/v1/jobs/{'0' * 32}/items/{'9' * 5000}/result")
    assert error_of(r) == (404, "job_not_found")


# ----------------------------------------------------------------- multipart boundaries


def _multipart(boundary: str, field: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """A file part ``field`` and an ``options`` field, written by hand: clients pick their
    own boundaries."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"options\"\r\n\r\n"
            f"{json.dumps(FAST)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize("path, field, ok", [("/v1/jobs", "files", 202),
                                             ("/v1/enhance", "image", 200)])
@pytest.mark.parametrize("length", [71, 257, 300, 5000])
def test_a_multipart_boundary_outside_rfc_2046_is_400(http, images, path, field, ok, length):
    body, headers = _multipart("b" * length, field, png(images))
    r = http.post(path, content=body, headers=headers)
    assert error_of(r) == (400, "bad_request"), r.text[:300]
    # The longest boundary RFC 2046 allows, beside it, works.
    body, headers = _multipart("-" * 20 + "b" * 50, field, png(images))
    good = http.post(path, content=body, headers=headers)
    assert good.status_code == ok, good.text[:300]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/enhance"])
def test_a_boundary_with_characters_outside_rfc_2046_is_400(http, images, path):
    for boundary in ("b@b", "b{b}", "b b "):  # "@", "{": not in its set; a space last
        body, headers = _multipart(boundary, "files" if path == "/v1/jobs" else "image",
                                   png(images))
        headers["content-type"] = f'multipart/form-data; boundary="{boundary}"'
        r = http.post(path, content=body, headers=headers)
        assert error_of(r) == (400, "bad_request"), (boundary, r.text[:300])


# ----------------------------------------------------------------- streams per key

STREAMS_APP = "photoenhance-streams"
STREAMS_PREFIX = "/streams"
HTTP_LIMITS = {"max_streams": 4, "max_streams_per_key": 2, "max_streams_per_job": 3,
               "stream_heartbeat_s": 2, "stream_idle_timeout_s": 300}


@dataclass
class KeyedApp:
    url: str
    keys: dict[str, str]

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120,
                            headers={"authorization": f"Bearer {self.keys[who]}"})


@pytest.fixture(scope="module")
def streams_app(serve_url: str, serve_args: dict[str, Any], tmp_path_factory) -> Iterator[KeyedApp]:
    """Keys on, and few stream slots: 4 in all, 2 per key. Deployed beside the dev app in
    the session's Ray, as tests/test_keys.py does (that one keeps the dev stream limits)."""
    from ray import serve

    from serve_app.deployments.app import build_app

    base = tmp_path_factory.mktemp("streams")
    keys_file = base / "keys"
    keys = {name: append_key(keys_file, name, "user")[0] for name in ("alice", "bob", "carol")}
    args = {
        **serve_args,
        "name": STREAMS_APP,
        "jobs": {**serve_args["jobs"], "data_dir": str(base / "data")},
        "model": {**serve_args["model"], "num_cpus": 0.5},
        "auth": {"enabled": True, "keys_file": str(keys_file), "keys_env": None,
                 "requests_per_second": 100.0, "burst": 200},
        "http": {**serve_args["http"], **HTTP_LIMITS},
    }
    serve.run(build_app(args), name=STREAMS_APP, route_prefix=STREAMS_PREFIX)
    try:
        yield KeyedApp(serve_url + STREAMS_PREFIX, keys)
    finally:
        serve.delete(STREAMS_APP)


def paused_job(client: httpx.Client, images: Any) -> str:
    """An unfinished job that does not change: many small items, one at a time, paused."""
    files = [("files", (f"{i}.png", png(images), "image/png")) for i in range(100)]
    r = client.post("/v1/jobs", files=files,
                    data={"max_inflight": "1", "options": json.dumps(FAST)})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    r = client.post(f"/v1/jobs/{job_id}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    return job_id


def open_stream(stack: ExitStack, client: httpx.Client, job_id: str) -> httpx.Response:
    """Opens the job's SSE stream and keeps it open (its slot held) until ``stack`` closes."""
    return stack.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events"))


def try_stream(client: httpx.Client, job_id: str) -> tuple[tuple[int, str], dict[str, str]]:
    """(status, code) and headers of a stream that should be refused; one that opens
    instead is closed at once (reading it would wait for its end)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        if r.status_code == 200:
            return (200, "opened"), dict(r.headers)
        r.read()
        return error_of(r), dict(r.headers)


def ws_refusal(app: KeyedApp, who: str, job_id: str) -> tuple[dict[str, Any], int]:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = app.url.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/ws"
    with connect(url, open_timeout=30,
                 additional_headers={"authorization": f"Bearer {app.keys[who]}"}) as ws:
        message = json.loads(ws.recv(timeout=60))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
    assert closed.value.rcvd is not None
    return message, closed.value.rcvd.code


def test_one_key_holding_its_share_of_streams_leaves_others_theirs(streams_app, images):
    alice, bob, carol = (streams_app.client(k) for k in ("alice", "bob", "carol"))
    with alice, bob, carol, ExitStack() as held:
        jobs = {name: paused_job(c, images) for name, c in
                (("alice", alice), ("bob", bob), ("carol", carol))}
        try:
            for _ in range(2):  # alice's share, on her own job (its cap is 3)
                assert open_stream(held, alice, jobs["alice"]).status_code == 200
            answer, headers = try_stream(alice, jobs["alice"])
            assert answer == (429, "too_many_key_streams") and headers["retry-after"] == "5"
            # The same share over a WebSocket: the error, then close code 4429.
            message, code = ws_refusal(streams_app, "alice", jobs["alice"])
            assert message["error"]["code"] == "too_many_key_streams" and code == 4429
            # Bob's stream on his own job opens: alice cannot take his slots.
            first = open_stream(held, bob, jobs["bob"])
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: an abandoned line iterator closes the stream
            assert next(lines).startswith(("data:", "id:", ":"))
            # The global cap still holds for total overload: 4 slots, all taken now.
            assert open_stream(held, bob, jobs["bob"]).status_code == 200
            answer, headers = try_stream(carol, jobs["carol"])
            assert answer == (503, "too_many_streams") and headers["retry-after"] == "5"
            del lines
        finally:
            held.close()
            for name, c in (("alice", alice), ("bob", bob), ("carol", carol)):
                c.post(f"/v1/jobs/{jobs[name]}/cancel")
        # Slots come back when streams close: carol's now opens (and ends when cancelled).
        with carol.stream("GET", f"/v1/jobs/{jobs['carol']}/events") as r:
            assert r.status_code == 200
