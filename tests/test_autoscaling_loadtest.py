"""The load-test runner end to end against a stub HTTP server (no Ray, no model): Locust
runs headless through a short ramp, failures are counted by status, replica samples turn
into scale events, and the JSON and PNG reports are written."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))

import run_scenario  # noqa: E402
from pe_data import parse_stages, png, stage_tick  # noqa: E402

# Never `import locust` here: it gevent-patches the whole test process. It is pinned in
# requirements.lock, so its absence is a broken install, not a reason to skip.
assert importlib.util.find_spec("locust") is not None, "locust is missing: run make install"


class _Stub(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).calls += 1
        if self.path.startswith("/v1/jobs"):
            self._reply(202, json.dumps({"job_id": "j1", "state": "queued"}).encode(), "application/json")
        elif type(self).calls % 5 == 0:
            self._reply(503, b'{"error": {"code": "queue_full", "message": "busy"}}', "application/json")
        else:
            self._reply(200, body, "image/png")

    def do_GET(self) -> None:  # noqa: N802
        self._reply(200, json.dumps({"job_id": "j1", "state": "completed"}).encode(), "application/json")

    def _reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_url() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_stages_and_image() -> None:
    assert parse_stages("2:3, 4:3,2:0") == [(2.0, 3), (4.0, 3), (2.0, 0)]
    with pytest.raises(ValueError):
        parse_stages("0:3")
    stages = parse_stages("10:4,10:4,10:0")
    assert stage_tick(stages, 5.0) == (4, 0.4)
    assert stage_tick(stages, 15.0) == (4, 0.1)
    assert stage_tick(stages, 25.0) == (0, 0.4)
    assert stage_tick(stages, 30.0) is None
    assert png(8, 4).startswith(b"\x89PNG")


def test_scenario_report(stub_url: str, tmp_path: Path) -> None:
    replicas = iter([1, 1, 1, 2, 2, 2, 2, 1])

    def fake_source() -> dict[str, Any]:
        return {"running": next(replicas, 1), "nodes": 1}

    scenario = run_scenario.Scenario(
        base_url=stub_url, locustfile="mix", stages="3:4,3:4,2:0", user_rate=4,
        image_size="16x12", job_files=2, sample_every_s=1, lead_s=1, tail_s=3,
        out=str(tmp_path / "report"),  # PE_KEEP_REPORT=dir keeps it
    )
    original = run_scenario.Sampler.__init__

    def with_fake(self: Any, sources: list[Any], every_s: float) -> None:
        original(self, [fake_source], every_s)

    mp = pytest.MonkeyPatch()
    mp.setattr(run_scenario.Sampler, "__init__", with_fake)
    try:
        report = run_scenario.run(scenario)
    finally:
        mp.undo()

    assert report["locust_exit_code"] == 0
    assert report["requests"] > 10
    assert set(report["errors_by_status"]) == {"503"}
    enhance = report["routes"]["POST /v1/enhance"]
    assert enhance["failures"] == 0 and enhance["p50_ms"] is not None
    assert any(name.startswith("JOB job completed") for name in report["routes"])
    assert [e["kind"] for e in report["replica_events"]][:1] == ["up"]
    assert (tmp_path / "report.json").exists() and (tmp_path / "report.png").stat().st_size > 1000
    assert "gevent" not in sys.modules  # the runner kept Locust in its subprocess
