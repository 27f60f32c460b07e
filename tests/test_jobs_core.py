"""The job core without Ray: manifest, names, inputs, the scheduler with a fake model.

These run in a second or two; the end-to-end behaviour through a real server is in
``test_jobs_api.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from serve_app.api.schemas import EnhancedImage
from serve_app.config import AppConfig, JobsConfig, StorageConfig
from serve_app.errors import InvalidImage, NotReady, Overloaded
from serve_app.jobs import sources
from serve_app.jobs.gate import Gate, PrivateAddress, check_address
from serve_app.jobs.item import backoff, classify
from serve_app.jobs.job import ITEM_FIELDS, Job
from serve_app.jobs.manifest import (
    OUTCOME_FIELDS,
    ItemError,
    ItemOutcome,
    ManifestRecord,
    ManifestWriter,
    read_manifest,
)
from serve_app.jobs.naming import new_job_id, plain_name, safe_stem, spool_name
from serve_app.jobs.scheduler import Scheduler
from serve_app.jobs.spec import JobSpec
from serve_app.jobs.storage import Storage


class FakeModel:
    """Echoes input bytes; fails per a script; can block until released."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: dict[bytes, int] = {}
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.block_after: int | None = None  # calls past this many never return

    async def __call__(self, data: bytes, options: object) -> EnhancedImage:
        self.calls[data] = self.calls.get(data, 0) + 1
        if self.block_after is not None and sum(self.calls.values()) > self.block_after:
            await asyncio.Event().wait()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if data.startswith(b"bad"):
            raise InvalidImage("not an image")
        if data.startswith(b"flaky") and self.calls[data] < 2:
            raise Overloaded("busy")
        if data.startswith(b"down"):
            raise Overloaded("always busy")
        return EnhancedImage(b"out:" + data, "image/png", "png", 2, 2)


def jobs_config(**kw: object) -> JobsConfig:
    base = {"max_inflight": 4, "max_inflight_per_job": 2, "retry_base_s": 0.01,
            "retry_max_s": 0.02, "min_free_bytes": 0, "max_attempts": 3}
    return JobsConfig(**{**base, **kw})


def make_inputs(folder: Path, contents: list[bytes]) -> list[tuple[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, body in enumerate(contents):
        path = folder / f"img{i}.png"
        path.write_bytes(body)
        items.append((str(path), path.name))
    return items


def new_job(tmp_path: Path, contents: list[bytes], **spec_kw: object) -> tuple[JobSpec, Path]:
    job_id = new_job_id()
    folder = tmp_path / "jobs" / job_id
    folder.mkdir(parents=True)
    items = make_inputs(tmp_path / "in", contents)
    sources.write_inputs(folder / sources.INPUTS, items)
    spec = JobSpec(job_id=job_id, created_at=0.0, kind="inputs", output=str(folder / "outputs"),
                   total=len(items), **spec_kw)
    return spec, folder


def scheduler(model: FakeModel, **kw: object) -> Scheduler:
    return Scheduler(jobs_config(**kw), model, max_bytes=1 << 20, timeout_s=5.0, gate=None)


async def until(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def manifest_indices(folder: Path) -> list[int]:
    return [rec.index for _, rec in read_manifest(folder / "manifest.jsonl")]


# ---------------------------------------------------------------------- names and files


def test_safe_names_stay_inside_the_folder() -> None:
    for evil in ["../../x.png", "..\\..\\x.png", "/etc/passwd", ".bashrc", "a/../../b.jpg",
                 "\x00\n.png", "ｆｕｌｌ.png", "..", ""]:
        name = spool_name(3, evil)
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert name.startswith("000003_")
    assert safe_stem("../../x.png") == "x"
    assert plain_name("dir/My Photo.JPG") == "dir/My Photo"  # outputs keep names: test_names.py


def record(index: int) -> ManifestRecord:
    return ManifestRecord(index=index, source=f"in{index}.png", status="succeeded")


def test_manifest_cuts_a_torn_tail_and_locks(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(record(0))
        w.append(record(1))
    with open(path, "ab") as f:
        f.write(b'{"index": 2, "sta')  # a writer killed mid-line
    assert [r.index for _, r in read_manifest(path)] == [0, 1]
    with ManifestWriter(path) as w:
        with pytest.raises(Exception, match="another process"):
            ManifestWriter(path)
        offset = w.append(record(2))
    assert [r.index for _, r in read_manifest(path)] == [0, 1, 2]
    assert path.read_bytes()[offset:].startswith(b'{"index":2')


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    storage.prepare()
    storage.write_atomic("a.png", b"one")
    storage.write_atomic("a.png", b"two")
    (tmp_path / "out" / ".a.png.x.tmp").write_bytes(b"torn")
    assert storage.remove_temporaries() == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png"]
    assert (tmp_path / "out" / "a.png").read_bytes() == b"two"


def test_free_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(str(tmp_path))
    free = storage.free_bytes()
    assert free and free > 0
    storage.check_space(1, 0)
    with pytest.raises(Exception) as info:
        storage.check_space(free + 1, 0)
    assert info.value.status == 507 and "free" in info.value.message


def gate_for(tmp_path: Path, *, allow_private: bool = False, **storage: object) -> Gate:
    jobs = JobsConfig(data_dir=tmp_path / "data", allow_private_urls=allow_private,
                      storage=StorageConfig(**storage))
    return Gate(AppConfig(jobs=jobs))


def test_private_addresses_are_refused(tmp_path: Path) -> None:
    for address in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1",
                    "::ffff:127.0.0.1", "0.0.0.0", "fd00::1", "100.64.0.1"]:
        with pytest.raises(PrivateAddress):
            check_address(address, allow_private=False)
        check_address(address, allow_private=True)
    check_address("8.8.8.8", allow_private=False)
    gate = gate_for(tmp_path)
    with pytest.raises(PrivateAddress):
        gate.url("http://localhost:9/x.png")
    with pytest.raises(PrivateAddress):
        gate.url("http://127.1/x.png")


def test_local_inputs_outside_roots_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "a" / "link.png").symlink_to(tmp_path / "secret.png")
    ok = str(root / "a" / "x.png")
    gate = gate_for(tmp_path, input_roots=[root])
    assert gate.input(ok).uri == ok
    for bad in [str(tmp_path / "secret.png"), str(root / ".." / "secret.png"),
                str(root / "a" / "link.png"), "relative/x.png"]:
        with pytest.raises(Exception) as info:
            gate.input(bad)
        assert info.value.status == 400


def test_prefix_listing_is_lazy_sorted_and_filtered(tmp_path: Path) -> None:
    for rel in ["b/2.png", "b/1.jpg", "a.webp", ".hidden.png", "notes.txt", "c/d/e.PNG"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    listed = [os.path.relpath(u, tmp_path) for u in sources.iter_prefix(str(tmp_path))]
    assert listed == ["a.webp", "b/1.jpg", "b/2.png", "c/d/e.PNG"]


def test_classify_and_backoff() -> None:
    assert classify(InvalidImage("x"))[:2] == ("permanent", "invalid_image")
    assert classify(Overloaded("x"))[0] == "transient"
    assert classify(NotReady("x"))[0] == "unavailable"
    assert classify(TimeoutError())[:2] == ("transient", "timeout")
    delays = [backoff(a, 0.5, 10.0) for a in range(1, 8)]
    assert 0.25 <= delays[0] <= 0.5 and all(d <= 10.0 for d in delays)
    assert delays[4] >= 4.0  # 0.5 * 2**4 = 8, half of it fixed


def test_an_item_outcome_is_its_manifest_record_less_what_recording_adds() -> None:
    """``ItemOutcome`` carries an item's result from ``item.py`` to its record; a record field
    without an outcome field (or the reverse) would be lost or refused on the way."""
    assert set(ManifestRecord.model_fields) == OUTCOME_FIELDS | {"index", "status", "finished_at"}
    assert {"source", "name", "error", "attempts", "timings", "bytes", "sha256", "width",
            "height", "format", "faces", "face_boxes"} == ITEM_FIELDS  # an item page's
    error = ItemError(code="invalid_image", message="m", stage="enhance")
    failed = ItemOutcome(source="in/a.png", attempts=2, timings={"total": 0.5}, error=error)
    record = failed.record(7)
    assert (record.index, record.status, record.source, record.attempts) == (
        7, "failed", "in/a.png", 2)
    assert record.error == error and record.name is None and record.finished_at > 0
    done = ItemOutcome(source="a.png", attempts=1, timings={}, name="a.png", bytes=3,
                       face_boxes=[(1, 2, 3, 4)])
    assert done.record(0).succeeded and done.record(0).face_boxes == [(1, 2, 3, 4)]


def test_a_manifest_line_begins_with_index_and_status_and_keeps_names_readable() -> None:
    record = ManifestRecord(index=3, source="Été/café.jpg", status="succeeded",
                            name="Été/café.png")
    line = record.line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    text = line.decode("utf-8")
    assert text.startswith('{"index":3,"status":"succeeded",')
    assert "café" in text and "\\u" not in text  # UTF-8 as written, not escaped
    assert ManifestRecord.model_validate_json(line) == record


# ---------------------------------------------------------------------- the scheduler


def test_job_runs_every_item_once_with_retries_and_permanent_failures(tmp_path: Path) -> None:
    contents = [f"ok{i}".encode() for i in range(30)] + [b"bad1", b"flaky1", b"down1"]

    async def main() -> None:
        model = FakeModel()
        spec, folder = new_job(tmp_path, contents)
        sched = scheduler(model)
        job = await sched.submit(spec, folder)
        sched.start()
        await until(lambda: job.state not in ("queued", "running"))
        await sched.stop()
        assert job.state == "partial"
        assert job.counts == [0, 0, 31, 2]
        records = {r.index: r for _, r in read_manifest(folder / "manifest.jsonl")}
        assert sorted(records) == list(range(33))
        assert records[30].error.code == "invalid_image" and records[30].attempts == 1
        assert records[31].status == "succeeded" and records[31].attempts == 2
        assert records[32].error.code == "overloaded" and records[32].attempts == 3
        out = folder / "outputs" / records[0].name
        assert out.read_bytes() == b"out:ok0"
        assert records[0].sha256 and records[0].bytes == 7
        page = job.items(30, 10, None)
        assert [r["status"] for r in page["items"]] == ["failed", "succeeded", "failed"]
        assert job.items(0, 5, "failed")["items"][0]["index"] == 30
        assert json.loads((folder / "state.json").read_text())["state"] == "partial"

    asyncio.run(main())


def test_bounded_inflight_and_priority(tmp_path: Path) -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = asyncio.Event()
        low_spec, low_folder = new_job(tmp_path / "low", [f"l{i}".encode() for i in range(10)])
        high_spec, high_folder = new_job(
            tmp_path / "high", [f"h{i}".encode() for i in range(10)], priority=5
        )
        sched = scheduler(model, max_inflight=3, max_inflight_per_job=3)
        low = await sched.submit(low_spec, low_folder)
        high = await sched.submit(high_spec, high_folder)
        sched.start()
        await until(lambda: sched.inflight == 3)
        await asyncio.sleep(0.05)
        assert high.inflight == 3 and low.inflight == 0 and low.state == "queued"
        model.gate.set()
        await until(lambda: low.state == "completed" and high.state == "completed")
        await sched.stop()

    asyncio.run(main())


def test_cancel_pause_resume(tmp_path: Path) -> None:
    async def main() -> None:
        model = FakeModel(delay=0.02)
        spec, folder = new_job(tmp_path, [f"x{i}".encode() for i in range(40)])
        sched = scheduler(model)
        job = await sched.submit(spec, folder)
        sched.start()
        await until(lambda: job.done >= 4)
        sched.control(job.id, "pause")
        await until(lambda: job.inflight == 0)
        done = job.done
        await asyncio.sleep(0.1)
        assert job.done == done and job.state == "paused"
        with pytest.raises(Exception) as info:
            sched.control(job.id, "pause")
        assert info.value.status == 409
        model.block_after = sum(model.calls.values()) + 6
        sched.control(job.id, "resume")
        await until(lambda: job.done >= done + 4)
        # Six more calls returned; the next ones are stuck in the model until cancelled.
        await until(lambda: sum(model.calls.values()) > model.block_after)
        sched.control(job.id, "cancel")
        # Only a cancelled task leaves the model: in flight reaches 0 because cancel cancels.
        await until(lambda: job.inflight == 0)
        assert job.state == "cancelled" and job.done < 40
        with pytest.raises(Exception) as info:
            sched.control(job.id, "resume")
        assert info.value.status == 409
        await sched.stop()
        indices = manifest_indices(folder)
        assert len(indices) == len(set(indices)) == job.done

    asyncio.run(main())


def test_cancel_before_an_item_task_starts_gives_its_slot_back(tmp_path: Path) -> None:
    """A cancel that lands between dispatch and the item task's first step (CI saw it: a
    cancelled job kept ``running: 1`` for ever, and the scheduler lost that slot)."""

    async def main() -> None:
        model = FakeModel()
        model.block_after = 0  # nothing returns: only cancel ends an item
        spec, folder = new_job(tmp_path, [f"c{i}".encode() for i in range(10)])
        sched = scheduler(model, max_inflight=2, max_inflight_per_job=2)
        job = await sched.submit(spec, folder)
        sched._fill()  # the loop's dispatch step, with no await before the cancel
        assert job.inflight == 2 and sched.inflight == 2 and not model.calls
        sched.control(job.id, "cancel")
        await until(lambda: not job.tasks)
        assert job.state == "cancelled" and job.inflight == 0 and sched.inflight == 0
        assert job.snapshot()["counts"]["running"] == 0 and not model.calls
        # The slots are free again: another job runs to the end.
        model.block_after = None
        spec2, folder2 = new_job(tmp_path / "second", [b"d0", b"d1", b"d2"])
        second = await sched.submit(spec2, folder2)
        sched.start()
        await until(lambda: second.state == "completed")
        await sched.stop()
        assert manifest_indices(folder) == [] and sorted(manifest_indices(folder2)) == [0, 1, 2]

    asyncio.run(main())


def test_restart_resumes_without_losing_or_repeating_items(tmp_path: Path) -> None:
    """A scheduler stopped mid-job (as a killed actor) and a new one over the same folder."""
    contents = [f"r{i}".encode() for i in range(60)]

    async def main() -> None:
        model = FakeModel(delay=0.01)
        spec, folder = new_job(tmp_path, contents)
        first = scheduler(model)
        job = await first.submit(spec, folder)
        first.start()
        await until(lambda: job.done >= 10)
        await first.stop()  # in-flight items are abandoned, as when the process dies
        before = manifest_indices(folder)
        # An output written whose record never was, and a torn last line:
        (folder / "outputs" / "img59.png").write_bytes(b"stale")
        with open(folder / "manifest.jsonl", "ab") as f:
            f.write(b'{"index":58,"status":"succ')

        second = scheduler(model)
        assert second.recover(tmp_path / "jobs") == [spec.job_id]
        again = second.jobs[spec.job_id]
        assert again.done == len(before)
        second.start()
        await until(lambda: again.state == "completed")
        await second.stop()
        indices = manifest_indices(folder)
        assert sorted(indices) == list(range(60)) and indices[: len(before)] == before
        assert (folder / "outputs" / "img59.png").read_bytes() == b"out:r59"
        for data in contents[:10]:
            if int(data[1:]) in before:
                assert model.calls[data] == 1  # recorded items were not re-run

        # A finished job read back is a summary, loaded on demand.
        third = scheduler(model)
        assert third.recover(tmp_path / "jobs") == []
        summary = third.jobs[spec.job_id]
        assert summary.state == "completed" and not summary.loaded and summary.total == 60
        assert summary.items(0, 2, None)["items"][1]["status"] == "succeeded"

    asyncio.run(main())


def test_prefix_job_lists_lazily_and_resumes_listing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_inputs(src, [f"p{i}".encode() for i in range(25)])

    async def main() -> None:
        job_id = new_job_id()
        folder = tmp_path / "jobs" / job_id
        spec = JobSpec(job_id=job_id, created_at=0.0, kind="prefix", input_prefix=str(src),
                       output=str(folder / "outputs"), total=None)
        # A listing cut short by a restart: ten entries known, not marked listed.
        folder.mkdir(parents=True)
        first_ten = sorted(str(p) for p in src.iterdir())[:10]
        sources.write_inputs(folder / sources.INPUTS, [(u, u) for u in first_ten])
        Job.create(spec, folder)
        sched = scheduler(FakeModel())
        sched.recover(tmp_path / "jobs")
        sched.start()
        job = sched.jobs[job_id]
        await until(lambda: job.state == "completed")
        await sched.stop()
        assert job.total == 25 and sorted(manifest_indices(folder)) == list(range(25))
        lines = (folder / "inputs.jsonl").read_text().splitlines()
        assert len(lines) == len(set(lines)) == 25

    asyncio.run(main())


def test_low_disk_pauses_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        spec, folder = new_job(tmp_path, [f"d{i}".encode() for i in range(5)])
        sched = scheduler(FakeModel(), min_free_bytes=10**18)
        job = await sched.submit(spec, folder)
        sched.start()
        await until(lambda: job.state == "paused")
        assert job.reason.startswith("low_disk") and job.done == 0
        with pytest.raises(Exception) as info:
            sched.control(job.id, "resume")
        assert info.value.status == 507
        await sched.stop()

    asyncio.run(main())


def test_http_fetch_refuses_private_and_reads_allowed(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            body = b"png-bytes" if self.path == "/img.png" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    strict, allowed = gate_for(tmp_path), gate_for(tmp_path, allow_private=True)

    async def main() -> None:
        kw = {"max_bytes": 1000, "timeout_s": 5.0}
        with pytest.raises(PrivateAddress):
            await sources.fetch(f"{base}/img.png", gate=strict, **kw)
        assert await sources.fetch(f"{base}/redirect", gate=allowed, **kw) == b"png-bytes"
        with pytest.raises(Exception) as info:
            await sources.fetch(f"{base}/missing.png", gate=allowed, **kw)
        assert info.value.code == "source_not_found"
        with pytest.raises(Exception) as info:
            await sources.fetch(f"{base}/img.png", gate=allowed, max_bytes=3, timeout_s=5)
        assert info.value.status == 413

    try:
        asyncio.run(main())
    finally:
        server.shutdown()

