"""Hostile requests to the dev application: each gets its documented status and error code
(docs/SECURITY.md lists them), nothing internal in the answer, and the server stays ready
and serves a good request beside them."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

FAST = {"face": "false", "bg_model": "none", "upscale": "1"}
DEEP = 3000  # past the JSON parser's recursion limit
LEAKS = ("Traceback", 'File "', "/work/", "/tmp/", "site-packages", "weights_dir")


@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    code: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def png(images: Any) -> bytes:
    return images.cv2_bytes(images.array(8, 8), ".png")


def api_cases(images: Any) -> list[Case]:
    """The cases of the API's own causes (options, JSON, names, content types, origins)."""
    image = png(images)
    deep_json = "[" * DEEP + "]" * DEEP
    nested = json.dumps({"options": {"a": [[[[[[[[[[1]]]]]]]]]]}})
    jobs_json = {"content-type": "application/json"}

    def enhance(name: str, params: dict[str, str], status: int, code: str) -> Case:
        return Case(name, "POST", "/v1/enhance", status, code,
                    {"params": {**FAST, **params}, "content": image})

    return [
        enhance("upscale=--2", {"upscale": "--2"}, 422, "invalid_option"),
        enhance("upscale=superscript-2", {"upscale": "\u00b2"}, 422, "invalid_option"),
        enhance("upscale=fullwidth-2", {"upscale": "\uff12"}, 422, "invalid_option"),
        enhance("quality=5000-digits", {"quality": "9" * 5000}, 422, "invalid_option"),
        enhance("tile=-5", {"tile": "-5"}, 422, "invalid_option"),
        enhance("weight=nan", {"weight": "nan"}, 422, "invalid_option"),
        enhance("weight=inf", {"weight": "inf"}, 422, "invalid_option"),
        enhance("weight=1e999", {"weight": "1e999"}, 422, "invalid_option"),
        enhance("unknown option", {"colour": "red"}, 422, "invalid_option"),
        enhance("options=[[[[... deep", {"options": deep_json}, 422, "json_too_deep"),
        enhance("options nested 10", {"options": nested}, 422, "json_too_deep"),
        enhance("options not JSON", {"options": "{nope"}, 422, "invalid_option"),
        enhance("options a list", {"options": "[1]"}, 422, "invalid_option"),
        enhance("options quality=1e999", {"options": '{"quality": 1e999}'}, 422, "invalid_option"),
        enhance("options quality=Infinity", {"options": '{"quality": Infinity}'}, 422,
                "invalid_option"),
        enhance("options 5000-digit int", {"options": '{"quality": ' + "9" * 5000 + "}"}, 422,
                "invalid_option"),
        enhance("options preset a list", {"options": '{"preset": ["x"]}'}, 422, "invalid_option"),
        enhance("options preset an object", {"options": '{"preset": {"a": 1}}'}, 422,
                "invalid_option"),
        Case("multipart options deep", "POST", "/v1/enhance", 422, "json_too_deep",
             {"files": {"image": ("a.png", image, "image/png")}, "data": {"options": deep_json}}),
        # Presets: names checked with anchored patterns, JSON bodies bounded.
        Case("preset name + newline", "PUT", "/v1/presets/soft%0A", 422, "invalid_option",
             {"json": {"upscale": 1}}),
        Case("preset name 65 chars", "PUT", "/v1/presets/" + "a" * 65, 422, "invalid_option",
             {"json": {"upscale": 1}}),
        Case("preset name unicode", "PUT", "/v1/presets/caf%C3%A9", 422, "invalid_option",
             {"json": {"upscale": 1}}),
        Case("preset name dot-dot", "PUT", "/v1/presets/%2E%2E", 422, "invalid_option",
             {"json": {"upscale": 1}}),
        Case("preset deep JSON", "PUT", "/v1/presets/deep", 400, "json_too_deep",
             {"content": deep_json, "headers": jobs_json}),
        Case("preset nested 10", "PUT", "/v1/presets/deep", 400, "json_too_deep",
             {"content": nested, "headers": jobs_json}),
        Case("preset JSON 5000-digit", "PUT", "/v1/presets/big", 400, "invalid_json",
             {"content": '{"quality": ' + "9" * 5000 + "}", "headers": jobs_json}),
        Case("preset quality=1e999", "PUT", "/v1/presets/big", 422, "invalid_option",
             {"content": '{"quality": 1e999}', "headers": jobs_json}),
        Case("preset without content type", "PUT", "/v1/presets/plain", 415,
             "unsupported_media_type", {"content": b'{"upscale": 1}'}),
        Case("preset as text/plain", "PUT", "/v1/presets/plain", 415, "unsupported_media_type",
             {"content": b'{"upscale": 1}', "headers": {"content-type": "text/plain"}}),
        Case("preset not JSON", "PUT", "/v1/presets/x", 400, "invalid_json",
             {"content": b"{", "headers": jobs_json}),
        Case("preset a list", "PUT", "/v1/presets/x", 422, "invalid_option", {"json": [1, 2]}),
        # Jobs: the one JSON reader bounds nesting and insists on the JSON type.
        Case("job deep JSON", "POST", "/v1/jobs", 400, "json_too_deep",
             {"content": deep_json, "headers": jobs_json}),
        Case("job inputs nested 10", "POST", "/v1/jobs", 400, "json_too_deep",
             {"content": json.dumps({"inputs": [[[[[[[[[["a"]]]]]]]]]]}), "headers": jobs_json}),
        Case("job without content type", "POST", "/v1/jobs", 415, "unsupported_media_type",
             {"content": json.dumps({"inputs": ["x.png"]})}),
        Case("job as text/plain", "POST", "/v1/jobs", 415, "unsupported_media_type",
             {"content": json.dumps({"inputs": ["x.png"]}),
              "headers": {"content-type": "text/plain"}}),
        # Job fields (the jobs package's causes; tests/test_jobs_hostile.py has the rest).
        *job_cases(),
        # Cross-site: a page elsewhere cannot make a browser submit or change anything.
        Case("cross-site job", "POST", "/v1/jobs", 403, "cross_origin",
             {"json": {"inputs": ["x.png"]}, "headers": {"origin": "https://evil.example"}}),
        Case("cross-site enhance", "POST", "/v1/enhance", 403, "cross_origin",
             {"content": image, "headers": {"origin": "null"}}),
        Case("cross-site preset delete", "DELETE", "/v1/presets/x", 403, "cross_origin",
             {"headers": {"origin": "http://127.0.0.1.evil.example"}}),
    ]


def job_cases() -> list[Case]:
    url = "http://127.0.0.1:9/a.png"

    def job(name: str, body: str | dict, status: int, code: str) -> Case:
        content = body if isinstance(body, str) else json.dumps(body)
        return Case(name, "POST", "/v1/jobs", status, code,
                    {"content": content, "headers": {"content-type": "application/json"}})

    return [
        job("priority=1e999", '{"inputs": ["' + url + '"], "priority": 1e999}', 400,
            "invalid_request"),
        job("max_inflight=Infinity", '{"inputs": ["' + url + '"], "max_inflight": Infinity}', 400,
            "invalid_request"),
        job("URL port 99999", {"inputs": ["http://127.0.0.1:99999/a.png"]}, 400, "invalid_uri"),
        job("broken IPv6 literal", {"inputs": ["http://[::1/a.png"]}, 400, "invalid_uri"),
        job("64-character DNS label", {"inputs": [f"http://{'a' * 64}.example/a.png"]}, 400,
            "invalid_uri"),
        job("NUL in an input path", {"inputs": ["/tmp/a\u0000.png"]}, 400, "invalid_uri"),
        job("NUL in the output", {"inputs": [url], "output": "/tmp/o\u0000"}, 400, "invalid_uri"),
        job("output local://", {"inputs": [url], "output": "local:///tmp/x"}, 400,
            "invalid_output"),
        job("output dir::file://", {"inputs": [url], "output": "dir::file:///tmp/x"}, 400,
            "invalid_uri"),
        job("input memory://", {"inputs": ["memory://x/a.png"]}, 400, "invalid_uri"),
    ]


def assert_clean(response: httpx.Response, case: str) -> dict[str, Any]:
    text = response.text
    for leak in LEAKS:
        assert leak not in text, (case, leak, text[:500])
    body = response.json()
    assert set(body) == {"error"}, (case, body)
    assert body["error"]["code"] and body["error"]["message"], (case, body)
    return body["error"]


def send(serve_url: str, case: Case) -> httpx.Response:
    with httpx.Client(base_url=serve_url, timeout=120) as client:
        return client.request(case.method, case.path, **case.kwargs)


def test_hostile_requests_beside_good_ones(http, serve_url, images):
    cases = api_cases(images)
    assert len({c.name for c in cases}) == len(cases)
    good = {"content": images.cv2_bytes(images.array(24, 32), ".png"), "params": FAST}
    with ThreadPoolExecutor(max_workers=8) as pool:
        goods = [pool.submit(http.post, "/v1/enhance", **good) for _ in range(3)]
        answers = [(case, pool.submit(send, serve_url, case)) for case in cases]
        wrong = []
        for case, future in answers:
            response = future.result()
            if response.status_code != case.status:
                wrong.append((case.name, response.status_code, response.text[:200]))
                continue
            error = assert_clean(response, case.name)
            if error["code"] != case.code:
                wrong.append((case.name, response.status_code, error["code"]))
        assert not wrong, wrong
        for future in goods:
            assert future.result().status_code == 200
    assert http.get("/readyz").status_code == 200
    assert http.post("/v1/enhance", **good).status_code == 200
    # Nothing the refused ones tried was saved.
    names = {p["name"] for p in http.get("/v1/presets").json()["presets"]}
    assert not names & {"soft\n", "deep", "big", "plain", "x", "a" * 65, "caf\u00e9"}


def test_same_site_and_originless_requests_pass(http, images, serve_url):
    """The origin check refuses other sites only: the server's own page and scripts work."""
    own = {"origin": serve_url}
    r = http.post("/v1/enhance", params=FAST, content=png(images), headers=own)
    assert r.status_code == 200, r.text
    r = http.put("/v1/presets/same-site", json={"upscale": 1}, headers=own)
    assert r.status_code == 201, r.text  # created (and deleted below: new on every run)
    assert http.delete("/v1/presets/same-site", headers=own).status_code == 204


def slowly(body: bytes, chunk: int = 256 * 1024, pause_s: float = 0.05) -> Iterator[bytes]:
    """A body that takes seconds to send: the early answer arrives while it still streams."""
    for at in range(0, len(body), chunk):
        yield body[at:at + chunk]
        time.sleep(pause_s)


def test_early_413_is_readable_by_urllib(serve_url, app_config):
    """urllib sends the whole body before reading (and asks for ``Connection: close``): the
    413 must still arrive whole, not as a reset, though it was sent long before the body
    ended."""
    body = b"\xff\xd8\xff" + b"\0" * (app_config.limits.max_bytes + 4 * 1024 * 1024)
    request = urllib.request.Request(
        f"{serve_url}/v1/enhance", data=slowly(body), method="POST",
        headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=120)
    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error"]["code"] == "payload_too_large"


def test_early_413_while_streaming_chunked(serve_url, app_config):
    """Without a Content-Length the limit trips while the body streams; the rest is drained
    and the answer read after the last chunk is sent."""
    chunk = b"\0" * 65536
    count = app_config.limits.max_bytes // len(chunk) + 48
    host, port = serve_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(b"POST /v1/enhance HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(count):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            if i > count - 48:
                time.sleep(0.05)  # the tail arrives after the answer was sent
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"payload_too_large" not in answer:
            block = sock.recv(65536)
            if not block:
                break
            answer += block
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer


# ---------------------------------------------------------------------------- streams


def read_events(
    url: str, timeout: float = 120.0, started: threading.Event | None = None
) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE stream until it ends; comments as ("comment", text).
    ``started`` is set once the stream answered (it holds its slot from then on)."""
    out: list[tuple[str, str]] = []
    event, data = "message", []
    with httpx.stream("GET", url, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        if started is not None:
            started.set()
        for line in response.iter_lines():
            if line.startswith(":"):
                out.append(("comment", line))
            elif line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                data.append(line.partition(":")[2].strip())
            elif not line and data:
                out.append((event, "\n".join(data)))
                event, data = "message", []
    return out


@pytest.fixture
def paused_job(http, images):
    """An unfinished job that does not change: many small items, one at a time, paused."""
    files = [("files", (f"{i}.png", png(images), "image/png")) for i in range(100)]
    r = http.post("/v1/jobs", files=files,
                  data={"max_inflight": "1", "options": json.dumps(FAST)})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    r = http.post(f"/v1/jobs/{job_id}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    try:
        yield job_id
    finally:
        http.post(f"/v1/jobs/{job_id}/cancel")


def test_streams_are_capped_idle_ones_end_and_ended_jobs_close(
    http, serve_url, app_config, paused_job
):
    limits = app_config.http
    url = f"{serve_url}/v1/jobs/{paused_job}/events"
    ws_url = serve_url.replace("http", "ws", 1) + f"/v1/jobs/{paused_job}/ws"
    started = [threading.Event() for _ in range(limits.max_streams_per_job)]
    with ThreadPoolExecutor(max_workers=limits.max_streams_per_job) as pool:
        held = [pool.submit(read_events, url, 120.0, s) for s in started]
        for s in started:  # every slot of the job is held: the next stream is refused
            assert s.wait(60)
        r = http.get(f"/v1/jobs/{paused_job}/events")
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_streams" and r.headers["retry-after"]
        # The same cap over a WebSocket: the error as a message, then close code 4429.
        refused, code = ws_messages(ws_url)
        assert refused == [{"error": refused[0]["error"]}] and code == 4429
        assert refused[0]["error"]["code"] == "too_many_streams"
        # Nothing changes on a paused job: each stream ends as idle, after heartbeats, with a
        # final `end` event that says so.
        for future in held:
            events = future.result()
            assert events[0][0] == "message" and json.loads(events[0][1])["job_id"] == paused_job
            assert any(kind == "comment" for kind, _ in events), events
            assert events[-1] == ("end", json.dumps({"reason": "idle"})), events[-3:]
    # Slots came back, and the stream of an ended job ends at once with `finished`.
    assert http.post(f"/v1/jobs/{paused_job}/cancel").status_code == 200
    events = read_events(url)
    assert json.loads(events[-2][1])["state"] == "cancelled"
    assert events[-1] == ("end", json.dumps({"reason": "finished"}))
    messages, code = ws_messages(ws_url)
    assert messages[-2]["state"] == "cancelled" and code == 1000
    assert messages[-1] == {"event": "end", "reason": "finished"}
    # A job that does not exist is a plain 404 before any stream starts (4404 over a socket).
    r = http.get("/v1/jobs/j20250101120000a1b2c3d4/events")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    messages, code = ws_messages(ws_url.replace(paused_job, "j20250101120000a1b2c3d4"))
    assert code == 4404 and messages[0]["error"]["code"] == "job_not_found"


def ws_messages(url: str) -> tuple[list[dict], int]:
    """Every message of a job's WebSocket until the server closes it, and the close code."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    messages = []
    with connect(url, open_timeout=30) as ws:
        try:
            while True:
                messages.append(json.loads(ws.recv(timeout=60)))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame from the server"
            return messages, closed.rcvd.code


# ---------------------------------------------------------------------------- fuzz

NASTY = [
    "", " ", "-", "--2", "\u00b2", "\uff12", "1e999", "-1e999", "Infinity", "NaN", "nan",
    "9" * 5000, "0x10", "1_000", "true", "null", "[]", "{}", "[" * 2000, '{"a":' * 50,
    "\x00", "a\x00b", "\n", "soft\n", "../../etc/passwd", "/etc/passwd", "file:///etc/passwd",
    "local:///tmp/x", "dir::file:///tmp", "memory://x", "http://[::1", "http://a:99999/x",
    "http://" + "a" * 64 + ".example/x", "ftp://127.0.0.1/x", "s3://", "\u202e", "\ud7ff",
    "%00", "%2e%2e/", "caf\u00e9", "\U0001f600" * 10,
]


def _fuzz_strategies():
    from hypothesis import strategies as st

    scalar = st.one_of(
        st.sampled_from(NASTY), st.text(max_size=40), st.integers(),
        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    )
    json_value = st.recursive(
        scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.text(max_size=12), inner, max_size=4), max_leaves=12,
    )
    text = st.one_of(st.sampled_from(NASTY), st.text(max_size=40))
    return st, scalar, json_value, text


def _option_names() -> list[str]:
    from serve_app.options import EnhanceOptions

    return [*EnhanceOptions.model_fields, "options", "preset", "unknown"]


JSON_HEADERS = {"Content-Type": "application/json"}


def _dumps(value: Any) -> str:
    """JSON as a hostile client may write it: NaN and Infinity literals included (httpx refuses them)."""
    return json.dumps(value, allow_nan=True)


# What fuzzed input may earn (which one depends on the input drawn): success, the router's
# trailing-slash redirect (307: a name ending in "/"), or one of the client-mistake answers
# of DESIGN.md, each in the error shape. Never a 5xx, nor a 4xx no route documents.
FUZZ_ANSWERS = {200, 201, 202, 204, 307, 400, 404, 405, 409, 413, 415, 422}


def assert_sane(response: httpx.Response, what: Any) -> None:
    status = response.status_code
    assert status in FUZZ_ANSWERS, (what, status, response.text[:300])
    if status >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"], (what, error)
    for leak in LEAKS:
        assert leak not in response.text, (what, leak, response.text[:300])


def _settings(examples: int):
    from hypothesis import HealthCheck, settings

    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_fuzz_enhance_options(http, images):
    """Query and multipart option fields of ``POST /v1/enhance``: never a 5xx or a leak."""
    from hypothesis import given

    st, _, _, text = _fuzz_strategies()
    image = png(images)
    fields = st.dictionaries(st.sampled_from(_option_names()), text, max_size=4)

    @_settings(80)
    @given(fields=fields, multipart=st.booleans())
    def run(fields: dict[str, str], multipart: bool) -> None:
        if multipart:
            r = http.post("/v1/enhance", files={"image": ("a.png", image, "image/png")},
                          data=fields)
        else:
            r = http.post("/v1/enhance", params=fields, content=image)
        assert_sane(r, fields)

    run()


def test_fuzz_json_bodies(http):
    """JSON fields of ``PUT /v1/presets/{name}`` and ``POST /v1/jobs`` (and the names)."""
    from hypothesis import given

    st, _, json_value, text = _fuzz_strategies()
    job_fields = ["inputs", "input_prefix", "output", "options", "priority", "max_inflight",
                  "webhook", "extra"]
    preset = st.dictionaries(st.sampled_from(_option_names()), json_value, max_size=4)
    job = st.dictionaries(st.sampled_from(job_fields), json_value, max_size=4)

    @_settings(120)
    @given(name=text, body=preset, job_body=job, raw=json_value)
    def run(name: str, body: dict, job_body: dict, raw: Any) -> None:
        from urllib.parse import quote

        path = "/v1/presets/" + quote(name, safe="") if name.strip("/.") else "/v1/presets/x"
        for payload in (body, raw):
            r = http.put(path, content=_dumps(payload), headers=JSON_HEADERS)
            assert_sane(r, (name, payload))
            if r.status_code in (200, 201):
                http.delete(path)
        for payload in (job_body, raw):
            r = http.post("/v1/jobs", content=_dumps(payload), headers=JSON_HEADERS)
            assert_sane(r, payload)
            if r.status_code == 202:
                http.post(f"/v1/jobs/{r.json()['job_id']}/cancel")

    run()


def test_fuzz_job_upload_fields(http, images):
    """Form fields of a multipart ``POST /v1/jobs``."""
    from hypothesis import given

    st, _, _, text = _fuzz_strategies()
    names = st.sampled_from(["priority", "output", "max_inflight", *_option_names()])

    @_settings(40)
    @given(fields=st.dictionaries(names, text, max_size=3))
    def run(fields: dict[str, str]) -> None:
        r = http.post("/v1/jobs", files=[("files", ("a.png", png(images), "image/png"))],
                      data=fields)
        assert_sane(r, fields)
        if r.status_code == 202:
            http.post(f"/v1/jobs/{r.json()['job_id']}/cancel")

    run()


def test_fuzz_reading_routes(http):
    """Path and query fields of the reading and control routes."""
    from urllib.parse import quote

    from hypothesis import given

    st, _, _, text = _fuzz_strategies()
    job_id = st.one_of(text, st.just("j20250101120000a1b2c3d4"))
    query = st.dictionaries(st.sampled_from(["state", "offset", "limit", "status", "x"]), text,
                            max_size=3)
    tails = ["", "/items", "/items/0/result", "/items/-1/result", "/manifest.jsonl",
             "/results.zip", "/events", "/cancel", "/pause", "/resume", "/nope"]

    @_settings(60)
    @given(job=job_id, params=query, tail=st.sampled_from(tails), name=text)
    def run(job: str, params: dict[str, str], tail: str, name: str) -> None:
        path = "/v1/jobs/" + quote(job, safe="") + tail if job.strip("/.") else "/v1/jobs"
        method = "POST" if tail in ("/cancel", "/pause", "/resume", "/nope") else "GET"
        assert_sane(http.request(method, path, params=params), (method, path, params))
        assert_sane(http.get("/v1/jobs", params=params), params)
        preset = "/v1/presets/" + quote(name, safe="") if name.strip("/.") else "/v1/presets"
        assert_sane(http.get(preset, params=params), preset)
        assert_sane(http.delete(preset), preset)
        for route in ("/v1/models", "/readyz", "/healthz"):
            assert_sane(http.get(route, params=params), route)

    run()
