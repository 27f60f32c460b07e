"""Jobs under pressure, with real files and real sockets: a manifest write that fails part-way
(a file-size limit enforced by the kernel), writers closed when jobs end, retention, fetch
deadlines and the per-job fetch cap against loopback HTTP servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve_app.api.schemas import EnhancedImage
from serve_app.config import AppConfig, JobsConfig
from serve_app.jobs import sources
from serve_app.jobs.gate import Gate
from serve_app.jobs.manifest import read_manifest
from serve_app.jobs.naming import new_job_id
from serve_app.jobs.scheduler import Scheduler
from serve_app.jobs.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]

# Runs in its own process: RLIMIT_FSIZE is per process. The kernel then writes a line that
# crosses the limit only up to it (a short write) and refuses the next (EFBIG), as a full
# disk does part-way through a write. Nothing in the code under test is replaced.
DISK_FULL = textwrap.dedent("""
    import asyncio, json, resource, signal, sys
    from pathlib import Path
    from serve_app.api.schemas import EnhancedImage
    from serve_app.config import JobsConfig
    from serve_app.jobs import sources
    from serve_app.jobs.scheduler import Scheduler
    from serve_app.jobs.spec import JobSpec

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    base, n, limit = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    async def enhance(data, options):
        return EnhancedImage(b"out:" + data, "image/png", "png", 2, 2)

    async def main():
        folder = base / "jobs" / "j1"
        folder.mkdir(parents=True)
        items = []
        for i in range(n):
            p = base / "in" / f"img{i}.png"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(f"x{i}".encode())
            items.append((str(p), p.name))
        sources.write_inputs(folder / sources.INPUTS, items)
        spec = JobSpec(job_id="j1", created_at=0.0, kind="inputs",
                       output=str(folder / "outputs"), total=n)
        config = JobsConfig(data_dir=base, min_free_bytes=0, max_inflight=1,
                            max_inflight_per_job=1)
        sched = Scheduler(config, enhance, max_bytes=1 << 20, timeout_s=5.0)
        job = await sched.submit(spec, folder)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        sched.start()
        while job.state != "paused":
            await asyncio.sleep(0.01)
        while job.inflight:
            await asyncio.sleep(0.01)
        paused = {"reason": job.reason, "done": job.done,
                  "size": (folder / "manifest.jsonl").stat().st_size}
        # Space is freed; the person resumes the job.
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        sched.control("j1", "resume")
        while job.state not in ("completed", "partial", "failed"):
            await asyncio.sleep(0.01)
        await sched.stop()
        print(json.dumps({"paused": paused, "state": job.state,
                          "writer_closed": job.writer is None}))

    asyncio.run(main())
""")


def test_manifest_stays_exactly_once_when_a_write_fails_part_way(tmp_path: Path) -> None:
    limit = 1700  # a few records in, and not on a line boundary
    out = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path), "20", str(limit)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    paused = result["paused"]
    assert paused["reason"].startswith("storage_error")
    # The failed write began under the limit, so part of its line reached the file (a short
    # write) and was cut off again: the manifest held whole lines only.
    assert 0 < paused["size"] < limit and paused["done"] >= 1
    assert result["state"] == "completed" and result["writer_closed"]

    manifest = tmp_path / "jobs" / "j1" / "manifest.jsonl"
    raw = manifest.read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines())
    indices = [r.index for _, r in read_manifest(manifest)]
    assert sorted(indices) == list(range(20)), indices  # each item exactly once


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size``: a file system that really fills up. Mounting needs root
    (CAP_SYS_ADMIN); the RLIMIT_FSIZE test above covers machines where that is not allowed."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "256k") as mount:
        yield mount


def test_manifest_stays_exactly_once_on_a_full_file_system(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    async def main() -> None:
        config = JobsConfig(data_dir=small_tmpfs, min_free_bytes=0, max_inflight=1,
                            max_inflight_per_job=1)
        sched = Scheduler(config, Echo(), max_bytes=1 << 20, timeout_s=5.0)
        spec, folder = new_job(small_tmpfs, 40)
        # Outputs elsewhere: only the job's own files (the manifest above all) fill the disk.
        spec = spec.model_copy(update={"output": str(tmp_path / "out")})
        job = await sched.submit(spec, folder)
        filler = small_tmpfs / "filler"
        with open(filler, "wb") as f:  # leave about 5 KiB free (a page and a bit)
            free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
            f.write(bytes(max(0, free - 5 * 1024)))
        sched.start()
        await until(lambda: job.state == "paused" and job.inflight == 0)
        assert job.reason.startswith("storage_error") and 0 < job.done < 40
        raw = (folder / "manifest.jsonl").read_bytes()
        assert raw.endswith(b"\n") and len(raw.splitlines()) == job.done
        filler.unlink()  # space is freed; the person resumes
        sched.control(job.id, "resume")
        await until(lambda: job.state == "completed")
        await sched.stop()
        indices = [r.index for _, r in read_manifest(folder / "manifest.jsonl")]
        assert sorted(indices) == list(range(40)), indices

    asyncio.run(main())


def test_a_chunked_upload_stops_at_the_free_space_floor(tmp_path: Path) -> None:
    """No Content-Length to check up front: the floor is checked while the body streams,
    on a 32 MiB tmpfs with a 26 MiB floor: the server stops reading once it has written
    past the floor (not after the whole body), and the half-spooled job leaves nothing."""
    import httpx
    from starlette.applications import Starlette

    from serve_app.api.errors import EXCEPTION_HANDLERS
    from serve_app.api.jobs import JobsApi, job_routes

    with tmpfs(tmp_path / "disk", "32m") as disk:
        config = AppConfig(jobs=JobsConfig(data_dir=disk, min_free_bytes=26 * 1024 * 1024))
        app = Starlette(routes=job_routes(JobsApi(config)), exception_handlers=EXCEPTION_HANDLERS)
        boundary = "b0undary"
        sent = [0]

        async def body() -> AsyncIterator[bytes]:
            for i in range(3):  # three files of 5 MiB: 15 MiB would cross the floor
                sent[0] += 1
                yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                       f"filename=\"f{i}.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
                for _ in range(5):
                    yield bytes(1024 * 1024)
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        async def post() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.post("/v1/jobs", content=body(), headers={
                    "content-type": f"multipart/form-data; boundary={boundary}"})

        r = asyncio.run(post())
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_storage" and "details" not in err
        assert sent[0] < 3, "the whole body was read before the floor was checked"
        jobs = disk / "data" / "jobs" if (disk / "data").exists() else disk / "jobs"
        assert not jobs.exists() or not any(jobs.iterdir())


# ---------------------------------------------------------------------- writers and retention


class Echo:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    async def __call__(self, data: bytes, options: object) -> EnhancedImage:
        await asyncio.sleep(self.delay)
        return EnhancedImage(b"out:" + data, "image/png", "png", 2, 2)


def new_job(base: Path, n: int) -> tuple[JobSpec, Path]:
    job_id = new_job_id()
    folder = base / "jobs" / job_id
    folder.mkdir(parents=True)
    items = []
    for i in range(n):
        p = base / "in" / f"{job_id}_{i}.png"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(f"y{i}".encode())
        items.append((str(p), p.name))
    sources.write_inputs(folder / sources.INPUTS, items)
    spec = JobSpec(job_id=job_id, created_at=0.0, kind="inputs", output=str(folder / "outputs"),
                   total=n)
    return spec, folder


async def until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_cancel_closes_the_writer_and_retention_removes_ended_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        config = JobsConfig(data_dir=tmp_path, min_free_bytes=0, retention_s=3600.0)
        sched = Scheduler(config, Echo(delay=0.02), max_bytes=1 << 20, timeout_s=5.0)
        spec, folder = new_job(tmp_path, 50)
        job = await sched.submit(spec, folder)
        done_spec, done_folder = new_job(tmp_path, 2)
        done = await sched.submit(done_spec, done_folder)
        sched.start()
        await until(lambda: job.done >= 3 and done.state == "completed")
        assert done.writer is None  # ended: its manifest is closed
        sched.control(job.id, "cancel")
        await until(lambda: job.inflight == 0)
        assert job.state == "cancelled" and job.writer is None

        assert await sched.expire(now=time.time() + 60) == []  # within the retention period
        expired = await sched.expire(now=time.time() + 3601)
        assert sorted(expired) == sorted([job.id, done.id])
        assert not folder.exists() and not done_folder.exists() and not sched.jobs
        await sched.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------- fetching


class _Slow(BaseHTTPRequestHandler):
    active = peak = 0
    lock = threading.Lock()
    gate = threading.Event()

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):  # one byte a second: each read is quick, the whole is not
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(1.0)
            return
        with _Slow.lock:
            _Slow.active += 1
            _Slow.peak = max(_Slow.peak, _Slow.active)
        _Slow.gate.wait(30)
        with _Slow.lock:
            _Slow.active -= 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def slow_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Slow.gate.set()
    server.shutdown()


def loopback_gate(tmp_path: Path) -> Gate:
    return Gate(AppConfig(jobs=JobsConfig(data_dir=tmp_path, allow_private_urls=True)))


def test_a_trickling_source_is_cut_at_the_whole_fetch_deadline(
    tmp_path: Path, slow_server: str
) -> None:
    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:
            await sources.fetch(f"{slow_server}/trickle", max_bytes=10_000, timeout_s=2.0,
                                gate=loopback_gate(tmp_path))
        assert info.value.code == "fetch_timeout" and info.value.status == 503
        assert time.monotonic() - t0 < 10.0  # 2 s deadline; generous for a loaded machine

    asyncio.run(main())


def test_fetches_in_flight_are_capped_per_job(tmp_path: Path, slow_server: str) -> None:
    _Slow.gate.clear()
    _Slow.active = _Slow.peak = 0

    async def main() -> None:
        config = JobsConfig(data_dir=tmp_path, min_free_bytes=0, max_inflight=8,
                            max_inflight_per_job=8, max_fetches_per_job=2)
        sched = Scheduler(config, Echo(), max_bytes=1 << 20, timeout_s=30.0,
                          gate=loopback_gate(tmp_path))
        job_id = new_job_id()
        folder = tmp_path / "jobs" / job_id
        folder.mkdir(parents=True)
        urls = [f"{slow_server}/img{i}.png" for i in range(6)]
        sources.write_inputs(folder / sources.INPUTS, [(u, u) for u in urls])
        spec = JobSpec(job_id=job_id, created_at=0.0, kind="inputs",
                       output=str(folder / "outputs"), total=6)
        job = await sched.submit(spec, folder)
        sched.start()
        await until(lambda: job.inflight == 6 and _Slow.active == 2)
        await asyncio.sleep(0.5)  # more fetches would have arrived by now
        assert _Slow.peak == 2
        _Slow.gate.set()
        await until(lambda: job.state == "completed")
        assert _Slow.peak == 2
        await sched.stop()

    asyncio.run(main())


class _Hosts(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Hosts.hosts.append(self.headers["Host"])
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


def test_a_fetch_connects_to_the_address_that_was_checked(tmp_path: Path) -> None:
    """The request goes to the checked address (no second DNS lookup to rebind), keeping the
    name in the Host header."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hosts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    gate = loopback_gate(tmp_path)
    try:
        pinned = gate.pin(f"http://localhost:{port}/a.png?x=1")
        assert pinned.url == f"http://127.0.0.1:{port}/a.png?x=1"
        assert pinned.headers == {"Host": f"localhost:{port}"}
        assert pinned.extensions == {"sni_hostname": "localhost"}
        data = asyncio.run(sources.fetch(f"http://localhost:{port}/a.png", max_bytes=100,
                                         timeout_s=10.0, gate=gate))
        assert data == b"hello" and _Hosts.hosts[-1] == f"localhost:{port}"
    finally:
        server.shutdown()
