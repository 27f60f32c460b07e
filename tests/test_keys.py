"""API keys and ownership, against a second application with keys on.

The keyed application is deployed once per module beside the dev one, in the same Ray
session (its own route prefix, data folder and job actor), so every other test keeps
talking to the keys-off dev application unchanged. Keys: users ``alice`` and ``bob``, a
user ``burst`` used only to trip the rate limit, ``quota`` to fill its job limit, and
admin ``root``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.auth import append_key

KEYED_APP = "photoenhance-keyed"
PREFIX = "/keyed"
FAST = {"face": "false", "bg_model": "none", "upscale": "1"}
RATE = {"requests_per_second": 2.0, "burst": 30}


@dataclass
class Keyed:
    url: str
    keys: dict[str, str]
    data_dir: Path

    def client(self, who: str | None) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def keyed(serve_url: str, serve_args: dict[str, Any], tmp_path_factory) -> Iterator[Keyed]:
    from ray import serve

    from serve_app.deployments.app import build_app

    base = tmp_path_factory.mktemp("keyed")
    keys_file = base / "keys"
    people = {"alice": "user", "bob": "user", "burst": "user", "quota": "user", "root": "admin"}
    keys = {name: append_key(keys_file, name, role)[0] for name, role in people.items()}  # type: ignore[arg-type]
    args = {
        **serve_args,
        "name": KEYED_APP,
        "jobs": {**serve_args["jobs"], "data_dir": str(base / "data")},
        "model": {**serve_args["model"], "num_cpus": 0.5},
        "auth": {"enabled": True, "keys_file": str(keys_file), "keys_env": None,
                 "max_jobs_in_flight": 3, **RATE},
    }
    serve.run(build_app(args), name=KEYED_APP, route_prefix=PREFIX)
    try:
        yield Keyed(serve_url + PREFIX, keys, base / "data")
    finally:
        serve.delete(KEYED_APP)


def png(images: Any) -> bytes:
    return images.cv2_bytes(images.array(8, 8), ".png")


def test_no_key_is_401_with_challenge(keyed, images):
    with keyed.client(None) as anon:
        for method, path, kwargs in [
            ("GET", "/v1/models", {}),
            ("GET", "/v1/jobs", {}),
            ("POST", "/v1/enhance", {"content": png(images), "params": FAST}),
            ("PUT", "/v1/presets/x", {"json": {"upscale": 1}}),
        ]:
            r = anon.request(method, path, **kwargs)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "unauthorized"
        wrong = {"authorization": "Bearer pe_not-a-key"}
        r = anon.get("/v1/models", headers=wrong)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        basic = {"authorization": f"Basic {keyed.keys['alice']}"}
        assert anon.get("/v1/models", headers=basic).status_code == 401
        # Keys are never read from the query string.
        assert anon.get("/v1/models", params={"key": keyed.keys["alice"]}).status_code == 401
        # Liveness and readiness stay open, and say nothing internal.
        assert anon.get("/healthz").status_code == 200
        ready = anon.get("/readyz")
        assert ready.status_code == 200 and "weights_dir" not in ready.text


def test_metrics_need_an_admin(keyed):
    with keyed.client(None) as anon, keyed.client("alice") as alice, keyed.client("root") as root:
        assert anon.get("/metrics").status_code == 401
        r = alice.get("/metrics")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = root.get("/metrics")
        assert r.status_code == 200 and "photoenhance_requests_total" in r.text


def test_engine_details_for_admins_only(keyed):
    with keyed.client("alice") as alice, keyed.client("root") as root:
        user_view = alice.get("/v1/models").json()["engine"]
        admin_view = root.get("/v1/models").json()["engine"]
    assert "weights_dir" not in user_view and user_view["synthetic"] is True
    assert "weights_dir" in admin_view


def test_enhance_with_a_key(keyed, images):
    with keyed.client("alice") as alice:
        r = alice.post("/v1/enhance", params=FAST, content=png(images))
    assert r.status_code == 200, r.text


def test_presets_per_key_and_global(keyed, images):
    with keyed.client("alice") as alice, keyed.client("bob") as bob, \
            keyed.client("root") as root:
        r = alice.put("/v1/presets/mine", json={"upscale": 1, "face": False})
        assert r.status_code == 201 and r.json()["scope"] == "own"
        r = root.put("/v1/presets/house", json={"upscale": 1, "bg_model": "none"})
        assert r.status_code == 201 and r.json()["scope"] == "global"

        def names(client: httpx.Client) -> set[str]:
            return {p["name"] for p in client.get("/v1/presets").json()["presets"]}

        assert {"mine", "house"} <= names(alice)
        assert "house" in names(bob) and "mine" not in names(bob)
        assert "mine" not in names(root)
        assert bob.get("/v1/presets/mine").status_code == 404
        # Using a preset by name: alice may, bob may not (it is not his).
        ok = alice.post("/v1/enhance", params={"preset": "mine", "bg_model": "none"},
                        content=png(images))
        assert ok.status_code == 200, ok.text
        r = bob.post("/v1/enhance", params={"preset": "mine"}, content=png(images))
        assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "preset"
        # A user cannot delete a global preset, nor another user's.
        assert bob.delete("/v1/presets/house").status_code == 404
        assert bob.delete("/v1/presets/mine").status_code == 404
        assert alice.delete("/v1/presets/mine").status_code == 204
        assert root.delete("/v1/presets/house").status_code == 204


def test_burst_gets_429_with_retry_after(keyed):
    with keyed.client("burst") as burst, ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: burst.get("/v1/presets"),
                                range(RATE["burst"] + 20)))
    statuses = [r.status_code for r in answers]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    limited = next(r for r in answers if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    # Other keys are not slowed by it.
    with keyed.client("bob") as bob:
        assert bob.get("/v1/presets").status_code == 200


JOB_OPTIONS = json.dumps({"face": False, "bg_model": "none", "upscale": 1})
ENDED = {"completed", "partial", "failed", "cancelled"}


def submit(client: httpx.Client, images: Any, count: int = 2) -> str:
    files = [("files", (f"{i}.png", png(images), "image/png")) for i in range(count)]
    r = client.post("/v1/jobs", files=files, data={"options": JOB_OPTIONS})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def wait_ended(client: httpx.Client, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ENDED or time.monotonic() > deadline:
            return job
        time.sleep(1.0)  # under the keys' request rate


def test_a_user_sees_and_controls_only_their_own_jobs(keyed, images):
    with keyed.client("alice") as alice, keyed.client("bob") as bob, \
            keyed.client("root") as root:
        mine, theirs = submit(alice, images), submit(bob, images)
        assert wait_ended(alice, mine)["state"] == "completed"
        assert wait_ended(bob, theirs)["state"] == "completed"

        def listed(client: httpx.Client) -> set[str]:
            return {j["job_id"] for j in client.get("/v1/jobs").json()["jobs"]}

        assert mine in listed(alice) and theirs not in listed(alice)
        assert theirs in listed(bob) and mine not in listed(bob)
        assert {mine, theirs} <= listed(root)
        assert alice.get(f"/v1/jobs/{mine}").json()["owner"] == "alice"

        base = f"/v1/jobs/{mine}"
        reads = [base, f"{base}/items", f"{base}/items/0/result", f"{base}/items/0/source",
                 f"{base}/manifest.jsonl", f"{base}/results.zip", f"{base}/events"]
        for path in reads:
            r = bob.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "job_not_found", path
            assert alice.get(path).status_code == 200, path
            assert root.get(path).status_code == 200, path
        for action in ("pause", "resume", "cancel"):
            r = bob.post(f"{base}/{action}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
        # Bob's controls did nothing: the job is as it was.
        assert alice.get(base).json()["state"] == "completed"
        # An unknown id answers exactly like another user's job.
        unknown = bob.get("/v1/jobs/j20250101120000a1b2c3d4")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"


def test_a_user_cannot_read_another_users_inputs(keyed, images):
    """Another job's uploads are not an input root, by prefix or by file."""
    with keyed.client("alice") as alice, keyed.client("bob") as bob:
        mine = submit(alice, images, count=1)
        wait_ended(alice, mine)
        folder = keyed.data_dir / "jobs" / mine
        uploads = sorted((folder / "inputs").iterdir())
        assert uploads
        tries = [{"input_prefix": str(folder)}, {"input_prefix": f"file://{folder}"},
                 {"input_prefix": str(folder / "inputs")}]
        tries += [{"inputs": [str(p)]} for p in uploads]
        before = {j["job_id"] for j in bob.get("/v1/jobs").json()["jobs"]}
        for body in tries:
            r = bob.post("/v1/jobs", json=body)
            # Every one a local path inside the jobs folder: refused before any read.
            assert (r.status_code, r.json()["error"]["code"]) == (400, "forbidden_path"), (
                body, r.text[:200])
            assert str(keyed.data_dir) not in r.text
        assert {j["job_id"] for j in bob.get("/v1/jobs").json()["jobs"]} == before


def test_jobs_in_flight_per_key(keyed):
    """``auth.max_jobs_in_flight`` (3 here): a fourth unfinished job is refused with 429."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)  # accepts connections, never answers: items stay in flight
    url = f"http://127.0.0.1:{hang.getsockname()[1]}/photo.png"
    with keyed.client("quota") as quota, keyed.client("bob") as bob:
        jobs = []
        try:
            for _ in range(3):
                r = quota.post("/v1/jobs", json={"inputs": [url]})
                assert r.status_code == 202, r.text
                jobs.append(r.json()["job_id"])
            r = quota.post("/v1/jobs", json={"inputs": [url]})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_jobs"
            assert int(r.headers["retry-after"]) >= 1
            # Another key is not limited by it.
            r = bob.post("/v1/jobs", json={"inputs": [url]})
            assert r.status_code == 202, r.text
            jobs.append(r.json()["job_id"])
        finally:
            for job_id in jobs[:3]:
                quota.post(f"/v1/jobs/{job_id}/cancel")
            for job_id in jobs[3:]:
                bob.post(f"/v1/jobs/{job_id}/cancel")
            hang.close()
