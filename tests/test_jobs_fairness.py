"""Keys are fair to each other, and a file that kills replicas does not spread (issue 17).

The scheduler's rules first, with the real ``Scheduler`` and real failing callables (no
Ray): the poison-pill rule, quotas taken atomically, paused jobs expiring, per-key output
folders in the gate. Then through a keys-on application deployed beside the dev one
(``/fair``): 30 concurrent submissions against the job quota, a job over the item quota,
per-key output folders, the client's ``output`` echoed, and a model replica killed under a
job's item, twice.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import job_ended, noise_png

from serve_app.api.schemas import EnhancedImage
from serve_app.auth import append_key
from serve_app.config import AppConfig, JobsConfig, StorageConfig
from serve_app.errors import InvalidImage, Overloaded, TooManyRequests
from serve_app.jobs import sources
from serve_app.jobs.gate import Gate
from serve_app.jobs.item import classify
from serve_app.jobs.job import Job
from serve_app.jobs.manifest import read_manifest
from serve_app.jobs.naming import new_job_id
from serve_app.jobs.quota import Quota
from serve_app.jobs.scheduler import Scheduler
from serve_app.jobs.spec import JobSpec

# ---------------------------------------------------------------------- helpers (no Ray)


class FakeModel:
    """Echoes its input; with ``gate`` set, waits for it first (items stay in flight)."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None

    async def __call__(self, data: bytes, options: object) -> EnhancedImage:
        if self.gate is not None:
            await self.gate.wait()
        return EnhancedImage(b"out:" + data, "image/png", "png", 2, 2)


def scheduler(model: Any, **kw: Any) -> Scheduler:
    base = {"max_inflight": 4, "max_inflight_per_job": 2, "retry_base_s": 0.01,
            "retry_max_s": 0.02, "min_free_bytes": 0, "max_attempts": 3}
    return Scheduler(JobsConfig(**{**base, **kw}), model, max_bytes=1 << 20, timeout_s=5.0,
                     gate=None)


def new_job(tmp_path: Path, contents: list[bytes]) -> tuple[JobSpec, Path]:
    """A job over local files holding ``contents``, writing into its own folder."""
    job_id = new_job_id()
    folder = tmp_path / "jobs" / job_id
    folder.mkdir(parents=True)
    inputs = tmp_path / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    items = []
    for i, body in enumerate(contents):
        (inputs / f"img{i}.png").write_bytes(body)
        items.append((str(inputs / f"img{i}.png"), f"img{i}.png"))
    sources.write_inputs(folder / sources.INPUTS, items)
    spec = JobSpec(job_id=job_id, created_at=0.0, kind="inputs", output=str(folder / "outputs"),
                   total=len(items))
    return spec, folder


async def until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def gate_for(tmp_path: Path, **storage: Any) -> Gate:
    jobs = JobsConfig(data_dir=tmp_path / "data", storage=StorageConfig(**storage))
    return Gate(AppConfig(jobs=jobs))

# ---------------------------------------------------------------------- poison pill


class Replica:
    """A model replica that batches: calls arriving within 50 ms share a batch, and a batch
    holding a ``poison`` input kills the replica, failing every call in it the way the
    ingress answers a replica that went away."""

    def __init__(self) -> None:
        self.deaths = 0
        self.calls: dict[bytes, int] = {}
        self._batch: list[bytes] | None = None
        self._fate: asyncio.Future[bool] | None = None

    async def __call__(self, data: bytes, options: object) -> Any:
        self.calls[data] = self.calls.get(data, 0) + 1
        if self._batch is None:
            self._batch, self._fate = [], asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.05, self._close)
        assert self._batch is not None and self._fate is not None
        self._batch.append(data)
        if await asyncio.shield(self._fate):
            raise Overloaded("a model replica went away; retry", code="replica_unavailable",
                             retry_after_s=1)
        if data.startswith(b"down"):
            raise Overloaded("always busy")
        return await FakeModel()(data, options)

    def _close(self) -> None:
        batch, fate = self._batch or [], self._fate
        self._batch = self._fate = None
        died = any(d.startswith(b"poison") for d in batch)
        self.deaths += died
        assert fate is not None
        fate.set_result(died)


def test_replica_deaths_are_their_own_kind() -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    assert classify(Overloaded("x", code="replica_unavailable"))[:2] == (
        "died", "replica_unavailable")
    assert classify(ActorDiedError())[:2] == ("died", "replica_unavailable")
    # A replica that may come back is not a death: the transient policy holds.
    assert classify(ActorUnavailableError("x", None))[:2] == ("transient", "ray_error")
    assert classify(Overloaded("x"))[:2] == ("transient", "overloaded")
    assert classify(InvalidImage("x"))[:2] == ("permanent", "invalid_image")


def test_a_file_that_kills_replicas_fails_after_two_deaths_and_spares_its_batch(
        tmp_path: Path) -> None:
    """The poison item shares its first batch with three others; all four see the replica
    die. Each is retried once, alone among suspects: the poison kills a second replica and
    fails ``replica_died`` (2 attempts); its neighbours succeed; the job goes on to its other
    items; other transient errors keep their three attempts."""
    contents = [b"ok0", b"poison", b"ok1", b"ok2"] + [f"ok{i}".encode() for i in range(3, 12)]
    contents.append(b"down")

    async def main() -> None:
        replica = Replica()
        spec, folder = new_job(tmp_path, contents)
        sched = scheduler(replica, max_inflight=4, max_inflight_per_job=4)  # type: ignore[arg-type]
        job = await sched.submit(spec, folder)
        sched.start()
        await until(lambda: job.state not in ("queued", "running"))
        await sched.stop()
        records = {r.index: r for _, r in read_manifest(folder / "manifest.jsonl")}
        assert sorted(records) == list(range(len(contents)))
        poison = records[1]
        assert poison.status == "failed" and poison.attempts == 2
        assert poison.error is not None and poison.error.code == "replica_died"
        assert "again on its one retry alone" in poison.error.message
        assert replica.calls[b"poison"] == 2 and replica.deaths == 2
        down = records[len(contents) - 1]
        assert down.error is not None and (down.error.code, down.attempts) == ("overloaded", 3)
        ok = [r for i, r in records.items() if i not in (1, len(contents) - 1)]
        assert all(r.status == "succeeded" for r in ok)
        # Its first batch's neighbours died with it once and were retried once.
        assert [records[i].attempts for i in (0, 2, 3)] == [2, 2, 2]
        assert job.state == "partial" and job.counts == [0, 0, len(contents) - 2, 2]

    asyncio.run(main())


def test_one_death_with_no_attempts_left_fails_replica_died(tmp_path: Path) -> None:
    async def main() -> None:
        replica = Replica()
        spec, folder = new_job(tmp_path, [b"poison", b"ok"])
        sched = scheduler(replica, max_attempts=1, max_inflight_per_job=1)  # type: ignore[arg-type]
        job = await sched.submit(spec, folder)
        sched.start()
        await until(lambda: job.state not in ("queued", "running"))
        await sched.stop()
        records = {r.index: r for _, r in read_manifest(folder / "manifest.jsonl")}
        assert records[0].error is not None and records[0].error.code == "replica_died"
        assert records[0].attempts == 1 and "no attempts left" in records[0].error.message
        assert records[1].status == "succeeded" and job.state == "partial"

    asyncio.run(main())


# ---------------------------------------------------------------------- quotas


def spec_of(tmp_path: Path, owner: str | None, total: int) -> tuple[JobSpec, Path]:
    """A job of ``total`` items (never run: the scheduler is not started)."""
    job_id = new_job_id()
    folder = tmp_path / "jobs" / job_id
    folder.mkdir(parents=True)
    sources.write_inputs(folder / sources.INPUTS,
                         [(f"/nowhere/{i}.png", f"{i}.png") for i in range(total)])
    spec = JobSpec(job_id=job_id, created_at=time.time(), kind="inputs",
                   output=str(folder / "outputs"), total=total, owner=owner)
    return spec, folder


def test_quota_counts_the_new_job_and_concurrent_creations(tmp_path: Path) -> None:
    async def main() -> None:
        sched = scheduler(FakeModel())
        quota = Quota(jobs=16, items=1000)

        async def submit(owner: str | None, total: int) -> str:
            spec, folder = spec_of(tmp_path, owner, total)
            try:
                await sched.submit(spec, folder, quota)
            except TooManyRequests as exc:
                assert exc.headers()["Retry-After"] == "30"
                return exc.code
            return "created"

        # 30 at once: each creation awaits a thread, so without the claim counting jobs
        # being created all 30 would pass a check-then-create.
        results = await asyncio.gather(*(submit("alice", 1) for _ in range(30)))
        assert results.count("created") == 16 and results.count("too_many_jobs") == 14
        # One job alone over the item limit; one that fits exactly; then one item more.
        assert await submit("bob", 1500) == "too_many_items"
        assert await submit("bob", 1000) == "created"
        assert await submit("bob", 1) == "too_many_items"
        # Other keys, and callers without a key, are not limited by them.
        assert await submit("carol", 1000) == "created"
        assert await submit(None, 5000) == "created"
        # An ended job frees its place.
        first = next(j for j in sched.jobs.values() if j.spec.owner == "alice")
        sched.control(first.id, "cancel")
        assert await submit("alice", 1) == "created"
        assert await submit("alice", 1) == "too_many_jobs"
        await sched.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------- paused jobs expire


def test_a_paused_job_expires_after_paused_ttl_s(tmp_path: Path) -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = asyncio.Event()  # items stay in the model: the jobs stay unfinished
        sched = scheduler(model, paused_ttl_s=0.5)
        paused = await sched.submit(*new_job(tmp_path / "a", [b"a0", b"a1", b"a2"]))
        running = await sched.submit(*new_job(tmp_path / "b", [b"b0", b"b1", b"b2"]))
        sched.start()
        await until(lambda: paused.inflight > 0 and running.inflight > 0)
        sched.control(paused.id, "pause")
        assert paused.paused_at is not None
        await until(lambda: paused.state == "cancelled", timeout=30)
        snap = paused.snapshot()
        assert snap["reason_code"] == "paused_expired"
        assert snap["reason"].startswith("paused_expired: the job stayed paused")
        saved = json.loads((paused.folder / "state.json").read_text())
        assert (saved["state"], saved["reason"]) == ("cancelled", "paused_expired")
        await until(lambda: paused.inflight == 0)  # its items in flight are abandoned
        assert running.state == "running"  # a job that runs is never expired
        await sched.stop()

    asyncio.run(main())


def test_paused_since_survives_a_restart_and_none_keeps_paused_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        spec, folder = new_job(tmp_path, [b"x0"])
        sched = scheduler(FakeModel(), paused_ttl_s=3600)
        job = await sched.submit(spec, folder)
        sched.control(job.id, "pause")
        paused_at = job.paused_at
        await sched.stop()
        assert paused_at is not None
        again = Job.open(folder)
        assert again.state == "paused" and again.paused_at == paused_at
        later = scheduler(FakeModel(), paused_ttl_s=3600)
        later.adopt(folder)
        await later.expire(now=paused_at + 3599)
        assert later.jobs[job.id].state == "paused"
        await later.expire(now=paused_at + 3601)
        assert later.jobs[job.id].state == "cancelled"
        assert later.jobs[job.id].snapshot()["reason_code"] == "paused_expired"
        await later.stop()

        spec, folder = new_job(tmp_path / "keep", [b"x0"])
        keep = scheduler(FakeModel(), paused_ttl_s=None)
        job = await keep.submit(spec, folder)
        keep.control(job.id, "pause")
        await keep.expire(now=time.time() + 10 * 365 * 86400)
        assert job.state == "paused"
        await keep.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------- output folders


def test_a_user_keys_outputs_stay_in_its_own_folder(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, output_buckets=["s3://pe-out/shared"])
    outputs = (tmp_path / "data" / "outputs").resolve()
    own = tmp_path / "data" / "jobs" / "j1" / "outputs"

    def out(uri: str, namespace: str | None) -> str:
        return gate.output(uri, own, namespace).uri

    # A user key: under the root, in its own folder, whatever it names.
    assert out(str(outputs), "alice") == str(outputs / "alice")
    assert out(str(outputs / "shoot"), "alice") == str(outputs / "alice" / "shoot")
    assert out(f"file://{outputs}/shoot", "alice") == str(outputs / "alice" / "shoot")
    assert out(str(outputs / "alice" / "x"), "alice") == str(outputs / "alice" / "x")
    assert out(str(outputs / "bob" / "x"), "alice") == str(outputs / "alice" / "bob" / "x")
    assert out("shoot1/day2", "alice") == str(outputs / "alice" / "shoot1" / "day2")
    assert out("s3://pe-out/shared", "alice") == "s3://pe-out/shared/alice"
    assert out("s3://pe-out/shared/bob/x", "alice") == "s3://pe-out/shared/alice/bob/x"
    assert out("s3://pe-out/shared/alice/x", "alice") == "s3://pe-out/shared/alice/x"
    assert out("", "alice") == str(own.resolve())
    # An admin key or a handle (no namespace): any allowed place, as written.
    assert out(str(outputs), None) == str(outputs)
    assert out(str(outputs / "bob" / "x"), None) == str(outputs / "bob" / "x")
    assert out("s3://pe-out/shared/x", None) == "s3://pe-out/shared/x"

    # Refusals stay refusals; a symlink cannot lead out of the key's folder.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outputs / "alice").mkdir(parents=True)
    (outputs / "alice" / "door").symlink_to(outside)
    cases = [("../x", "alice", "forbidden_path"), ("a/../../x", "alice", "forbidden_path"),
             (str(outputs / "door" / "x"), "alice", "forbidden_path"),
             (str(outputs / "alice" / "door"), "alice", "forbidden_path"),
             ("relative", None, "invalid_uri"), (str(tmp_path / "elsewhere"), "alice",
                                                 "forbidden_path"),
             ("s3://pe-out/other", "alice", "forbidden_path")]
    for uri, namespace, code in cases:
        with pytest.raises(Exception) as info:
            out(uri, namespace)
        assert (info.value.status, info.value.code) == (400, code), uri


# ---------------------------------------------------------------------- through HTTP

FAIR_APP = "photoenhance-fair"
PREFIX = "/fair"
MAX_JOBS, MAX_ITEMS = 4, 10
FAST = {"face": False, "bg_model": "none", "upscale": 1}
SLOW = {"upscale": 4, "face": False, "bg_model": "RealESRGAN_x4plus", "tile": 32}


@dataclass
class Fair:
    url: str
    keys: dict[str, str]
    data_dir: Path

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=300,
                            headers={"authorization": f"Bearer {self.keys[who]}"})


@pytest.fixture(scope="module")
def fair(serve_url: str, serve_args: dict[str, Any], tmp_path_factory) -> Iterator[Fair]:
    from ray import serve

    from serve_app.client import wait_ready
    from serve_app.deployments.app import build_app

    base = tmp_path_factory.mktemp("fair")
    keys_file = base / "keys"
    people = {"alice": "user", "bob": "user", "many": "user", "big": "user", "root": "admin"}
    keys = {name: append_key(keys_file, name, role)[0] for name, role in people.items()}  # type: ignore[arg-type]
    args = copy.deepcopy(serve_args)
    args["name"] = FAIR_APP
    args["jobs"]["data_dir"] = str(base / "data")
    args["model"].update(num_cpus=0)
    args["ingress"].update(num_cpus=0)
    args["auth"] = {"enabled": True, "keys_file": str(keys_file), "keys_env": None,
                    "max_jobs_in_flight": MAX_JOBS, "max_items_in_flight": MAX_ITEMS,
                    "requests_per_second": 100.0, "burst": 200}
    serve.run(build_app(args), name=FAIR_APP, route_prefix=PREFIX)
    wait_ready(serve_url + PREFIX, 300)
    try:
        yield Fair(serve_url + PREFIX, keys, base / "data")
    finally:
        serve.delete(FAIR_APP)


@pytest.fixture
def hanging_url() -> Iterator[str]:
    """A URL whose server accepts connections and never answers: items stay in flight."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)
    try:
        yield f"http://127.0.0.1:{hang.getsockname()[1]}/photo.png"
    finally:
        hang.close()


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["code"] == code, body
    return body


def cancel_all(client: httpx.Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        client.post(f"/v1/jobs/{job_id}/cancel")


def test_thirty_concurrent_submissions_get_exactly_the_job_quota(fair: Fair,
                                                                 hanging_url: str) -> None:
    with fair.client("many") as many, ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(
            lambda _: many.post("/v1/jobs", json={"inputs": [hanging_url]}), range(30)))
        created = [r.json()["job_id"] for r in answers if r.status_code == 202]
        try:
            refused = [r for r in answers if r.status_code != 202]
            assert len(created) == MAX_JOBS, [r.status_code for r in answers]
            for r in refused:
                error_of(r, 429, "too_many_jobs")
                assert int(r.headers["retry-after"]) == 30
            live = [j for j in many.get("/v1/jobs").json()["jobs"] if j["finished_at"] is None]
            assert sorted(j["job_id"] for j in live) == sorted(created)
        finally:
            cancel_all(many, created)


def test_one_job_over_the_item_quota_is_refused(fair: Fair, hanging_url: str) -> None:
    with fair.client("big") as big:
        error_of(big.post("/v1/jobs", json={"inputs": [hanging_url] * (MAX_ITEMS + 1)}),
                 429, "too_many_items")
        r = big.post("/v1/jobs", json={"inputs": [hanging_url] * MAX_ITEMS})
        assert r.status_code == 202, r.text
        try:
            r2 = big.post("/v1/jobs", json={"inputs": [hanging_url]})
            error_of(r2, 429, "too_many_items")
            assert int(r2.headers["retry-after"]) == 30
        finally:
            cancel_all(big, [r.json()["job_id"]])


def test_each_key_writes_in_its_own_folder_and_sees_what_it_sent(fair: Fair,
                                                                 hanging_url: str) -> None:
    outputs = fair.data_dir / "outputs"
    photo = fair.data_dir / "inputs" / "fair" / "one.png"
    photo.parent.mkdir(parents=True, exist_ok=True)
    photo.write_bytes(noise_png(17))

    def resolved(job_id: str) -> str:
        return json.loads((fair.data_dir / "jobs" / job_id / "job.json").read_text())["output"]

    with fair.client("alice") as alice, fair.client("bob") as bob, \
            fair.client("root") as root:
        held: list[tuple[httpx.Client, str]] = []
        try:
            # The case: alice's paused job names the whole shared root.
            r = alice.post("/v1/jobs", json={"inputs": [hanging_url], "output": str(outputs)})
            assert r.status_code == 202, r.text
            paused = r.json()["job_id"]
            held.append((alice, paused))
            assert r.json()["output"] == str(outputs)  # echoed as sent
            assert resolved(paused) == str(outputs / "alice")
            assert alice.post(f"/v1/jobs/{paused}/pause").status_code == 200
            for read in (alice.get(f"/v1/jobs/{paused}").json(),
                         next(j for j in alice.get("/v1/jobs").json()["jobs"]
                              if j["job_id"] == paused)):
                assert read["output"] == str(outputs) and read["state"] == "paused"

            # Bob is not blocked by it, and cannot write into alice's folder.
            for sent, lands in [(str(outputs / "x"), outputs / "bob" / "x"),
                                (str(outputs / "alice"), outputs / "bob" / "alice")]:
                r = bob.post("/v1/jobs", json={"inputs": [hanging_url], "output": sent})
                assert r.status_code == 202, r.text
                held.append((bob, r.json()["job_id"]))
                assert r.json()["output"] == sent
                assert resolved(r.json()["job_id"]) == str(lands)

            # Alice's own second job inside her live one's folder: 409, naming nothing.
            r = alice.post("/v1/jobs", json={"inputs": [hanging_url],
                                             "output": str(outputs / "sub")})
            body = error_of(r, 409, "output_in_use")
            assert str(fair.data_dir) not in r.text and paused not in r.text
            assert "alice" not in body["message"] and "bob" not in body["message"]

            # An admin may write anywhere allowed, as named (here: not around a live job).
            r = root.post("/v1/jobs", json={"inputs": [hanging_url],
                                            "output": str(outputs / "admin")})
            assert r.status_code == 202, r.text
            held.append((root, r.json()["job_id"]))
            assert resolved(r.json()["job_id"]) == str(outputs / "admin")
            assert r.json()["output"] == str(outputs / "admin")
        finally:
            for client, job_id in held:
                client.post(f"/v1/jobs/{job_id}/cancel")

        # A relative output: under the first root, in bob's folder; the files land there.
        r = bob.post("/v1/jobs", json={"inputs": [str(photo)], "output": "shoot1",
                                       "options": FAST})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 180
        while not job_ended(snap := bob.get(f"/v1/jobs/{job_id}").json()):
            assert time.monotonic() < deadline, snap
            time.sleep(0.2)
        assert snap["state"] == "completed" and snap["output"] == "shoot1"
        written = [p.name for p in (outputs / "bob" / "shoot1").iterdir()]
        assert len(written) == 1 and written[0].startswith(job_id), written


def _enhancer(app: str) -> tuple[str, int]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"]["Enhancer"]["replicas"]
    running = [r for r in replicas if r["state"] == "RUNNING"]
    return (running[0]["replica_id"], running[0]["pid"]) if len(running) == 1 else ("", 0)


def _model_in_flight(app: str) -> float:
    """Requests the model replica itself holds (its autoscaling stats, asked directly)."""
    from ray import serve

    handle = serve.get_deployment_handle("Enhancer", app_name=app)
    return float(handle.record_autoscaling_stats.remote().result(timeout_s=60)["in_flight"])


def test_an_item_whose_replica_dies_twice_fails_replica_died_and_the_job_goes_on(
        fair: Fair) -> None:
    """A slow item (640 px at x4 in 32 px tiles: seconds in the model) and two quick ones,
    one at a time. The model replica's process is SIGKILLed while the slow item is in it;
    the item is retried once alone on the next replica, which is killed too: the item fails
    ``replica_died`` after exactly two attempts, the other two succeed."""
    folder = fair.data_dir / "inputs" / "poison"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_slow.png").write_bytes(noise_png(31, 640, 640))
    (folder / "b.png").write_bytes(noise_png(32))
    (folder / "c.png").write_bytes(noise_png(33))

    def kill_when_in_the_model(client: httpx.Client, job_id: str, after: str) -> str:
        """Wait for a new replica (other than ``after``) and the slow item's model call in
        the ingress (past its door: routed to the replica, or in it), then SIGKILL the
        replica's process; returns the killed replica's id."""
        deadline = time.monotonic() + 300
        while True:
            replica_id, pid = _enhancer(FAIR_APP)
            item = client.get(f"/v1/jobs/{job_id}/items?limit=1").json()["items"][0]
            assert item["status"] in ("pending", "running"), item
            door = re.search(r"^photoenhance_door_active ([0-9.e+-]+)$",
                             client.get("/metrics").text, re.M)
            if (replica_id and replica_id != after and item["status"] == "running"
                    and door and float(door.group(1)) == 1.0):
                break
            assert time.monotonic() < deadline, "the slow item never reached a replica"
            time.sleep(0.1)
        # Into the model itself: the replica counts the item among its own requests.
        while _model_in_flight(FAIR_APP) < 1.0:
            assert time.monotonic() < deadline, "the slow item never reached the model"
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        return replica_id

    with fair.client("root") as root:
        r = root.post("/v1/jobs", json={"input_prefix": str(folder), "max_inflight": 1,
                                        "options": SLOW})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        first = kill_when_in_the_model(root, job_id, after="")
        kill_when_in_the_model(root, job_id, after=first)
        deadline = time.monotonic() + 600
        while not job_ended(snap := root.get(f"/v1/jobs/{job_id}").json()):
            assert time.monotonic() < deadline, snap
            time.sleep(0.5)
        items = root.get(f"/v1/jobs/{job_id}/items").json()["items"]
    assert snap["state"] == "partial" and snap["counts"]["failed"] == 1
    slow, *rest = items
    assert slow["status"] == "failed" and slow["attempts"] == 2
    assert slow["error"]["code"] == "replica_died"
    assert "again on its one retry alone" in slow["error"]["message"]
    assert [(i["status"], i["attempts"]) for i in rest] == [("succeeded", 1)] * 2
