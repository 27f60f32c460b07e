"""The client and ``photoenhance enhance`` against a real small HTTP server that answers 503
(with ``Retry-After``) before 200: retries wait at least what the server asked, give up after
``--retries``, print one line per failed file and exit with status 1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from serve_app.cli import main
from serve_app.client import ApiError, Client

RETRY_AFTER_S = 1
IMAGE = b"\x89PNG\r\n\x1a\n" + b"result"


class Busy(BaseHTTPRequestHandler):
    """Answers ``fail_first`` requests per path with 503 + Retry-After, then 200."""

    fail_first = 2
    calls: dict[str, list[float]] = {}
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            times = self.calls.setdefault(self.headers.get("X-Test-Key", "") + self.path, [])
            times.append(time.monotonic())
            busy = len(times) <= self.fail_first
        if busy:
            body = json.dumps({"error": {"code": "overloaded", "message": "busy"}}).encode()
            self.send_response(503)
            self.send_header("Retry-After", str(RETRY_AFTER_S))
            self.send_header("Content-Type", "application/json")
        else:
            body = IMAGE
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("X-Image-Width", "8")
            self.send_header("X-Image-Height", "8")
            self.send_header("X-Faces-Restored", "2")
            self.send_header("X-Face-Boxes", "1,2,3,4 -2,0,8,8 x,1,2,3")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def busy_server() -> Iterator[tuple[str, type[Busy]]]:
    handler = type("BusyHandler", (Busy,), {"calls": {}, "fail_first": 2})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_client_retries_503_honouring_retry_after(busy_server) -> None:
    url, handler = busy_server
    with Client(url, retries=3, max_backoff_s=10) as client:
        result = client.enhance(b"img", upscale=2)
    assert result.data == IMAGE and (result.width, result.height) == (8, 8)
    assert result.faces == 2 and result.face_boxes == ((1, 2, 3, 4), (-2, 0, 8, 8))
    times = handler.calls["/v1/enhance?upscale=2"]
    assert len(times) == 3
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(gap >= RETRY_AFTER_S - 0.05 for gap in gaps), gaps


def test_client_gives_up_after_its_retries(busy_server) -> None:
    url, handler = busy_server
    handler.fail_first = 10
    with Client(url, retries=1, max_backoff_s=10) as client, pytest.raises(ApiError) as err:
        client.enhance(b"img")
    assert (err.value.status, err.value.code, err.value.retry_after) == (503, "overloaded", 1.0)
    assert len(handler.calls["/v1/enhance"]) == 2


def test_cli_retries_then_succeeds_and_exits_0(busy_server, tmp_path: Path) -> None:
    url, handler = busy_server
    src = tmp_path / "a.png"
    src.write_bytes(b"img")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["enhance", str(src), "--out", str(out), "--server", url,
                                  "--retries", "3"])
    assert r.exit_code == 0, r.output
    assert (out / "a.png").read_bytes() == IMAGE
    times = handler.calls["/v1/enhance"]
    assert len(times) == 3 and times[2] - times[0] >= 2 * RETRY_AFTER_S - 0.1


def test_cli_exits_1_with_one_line_per_failed_file(busy_server, tmp_path: Path) -> None:
    url, handler = busy_server
    handler.fail_first = 100
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"img")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["enhance", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                                  "--out", str(out), "--server", url, "--retries", "1"])
    assert r.exit_code == 1, r.output
    failed = [line for line in r.output.splitlines() if line.startswith("FAILED")]
    assert sorted(failed) == [
        f"FAILED {tmp_path / 'a.png'}: 503 overloaded: busy",
        f"FAILED {tmp_path / 'b.png'}: 503 overloaded: busy",
    ]
    assert "0 of 2" in r.output and "2 failed" in r.output
    assert not out.exists() or not any(out.iterdir())
