"""The jobs reader: jobs, their items, manifests and results, filtered by owner.

Snapshots and item pages come from the job actor; manifests and result bytes are read
from storage by the calling process (chunk by chunk, never whole), not sent through the
actor. ``owner`` None reads everyone's jobs; a job of another owner is "not found", so its
existence is not revealed. Which owner a caller may read as is the API layer's decision.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from serve_app import codec
from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, NotFound
from serve_app.jobs import manager as mgr
from serve_app.jobs.manifest import MANIFEST, ManifestRecord, read_manifest
from serve_app.jobs.naming import is_job_id, zip_member
from serve_app.jobs.sources import INPUTS
from serve_app.jobs.spec import ITEM_STATES, JOB_JSON, TERMINAL, JobSpec, read_json
from serve_app.jobs.storage import Storage

EVENT_INTERVAL_S = 0.5
MAX_PAGE = 1000
CHUNK = 256 * 1024


@dataclass(frozen=True)
class ItemResult:
    """One item's output: its record and its bytes, streamed."""

    record: ManifestRecord
    media_type: str
    chunks: Iterator[bytes]


@dataclass(frozen=True)
class ItemSource:
    """An upload's own input: its spooled name (``000003_photo.jpg``: safe characters only),
    media type (from its magic bytes), size and bytes, streamed."""

    name: str
    media_type: str
    size: int
    chunks: Iterator[bytes]


@dataclass(frozen=True)
class ManifestBytes:
    """The manifest as it is now: ``size`` bytes of whole lines."""

    size: int
    chunks: Iterator[bytes]


class JobReader:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.jobs_dir = mgr.jobs_dir(config)
        mgr.configure_fsspec(config)

    async def _storage(self, job_id: str) -> Storage:
        """The job's output storage, from its spec (answers do not carry server paths)."""
        path = self.jobs_dir / job_id / JOB_JSON
        spec = JobSpec.model_validate(await asyncio.to_thread(read_json, path))
        return Storage(spec.output)

    async def _call(self, method: str, *args: Any) -> Any:
        return await mgr.call_manager(self.config, method, *args)

    # ------------------------------------------------------------------ jobs

    async def get(self, job_id: str, *, owner: str | None = None) -> dict[str, Any]:
        """The job's snapshot; ``NotFound`` when unknown or another owner's."""
        if not is_job_id(job_id):
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        snapshot = await self._call("get_job", job_id)
        if owner is not None and snapshot.get("owner") != owner:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        return snapshot

    async def list(self, *, state: str | None = None,
                   owner: str | None = None) -> list[dict[str, Any]]:
        return await self._call("list_jobs", state, owner)

    async def items(self, job_id: str, *, offset: int = 0, limit: int = 100,
                    status: str | None = None, owner: str | None = None) -> dict[str, Any]:
        """A page of items: ``{"items", "offset", "limit", "total"}``."""
        if status is not None and status not in ITEM_STATES:
            raise InvalidRequest(f"status must be one of {list(ITEM_STATES)}", code="invalid_query")
        await self.get(job_id, owner=owner)
        limit = max(0, min(limit, MAX_PAGE))
        return await self._call("items", job_id, max(offset, 0), limit, status)

    async def progress(self, job_id: str, *,
                       owner: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The current snapshot, then one per state change or at most every 500 ms while
        anything moves; ends after the job's final state (or when it is deleted)."""
        snapshot = await self.get(job_id, owner=owner)
        yield snapshot
        last = _event_key(snapshot)
        while snapshot["state"] not in TERMINAL:
            started = time.monotonic()
            try:
                snapshot = await self._call("watch", job_id, EVENT_INTERVAL_S)
            except NotFound:  # deleted while watched: the stream just ends
                return
            key = _event_key(snapshot)
            if key != last:
                yield snapshot
                last = key
            elif time.monotonic() - started < EVENT_INTERVAL_S / 2:
                await asyncio.sleep(EVENT_INTERVAL_S / 2)

    # ------------------------------------------------------------------ results

    async def item_result(self, job_id: str, index: int, *,
                          owner: str | None = None) -> ItemResult:
        await self.get(job_id, owner=owner)
        record: ManifestRecord | None = await self._call("record", job_id, index)
        if record is None:
            raise NotFound(f"item {index} of job {job_id} has no result (yet)",
                           code="result_not_ready")
        if not record.succeeded or record.name is None:
            code = record.error.code if record.error else "failed"
            raise NotFound(f"item {index} failed: {code}", code="item_failed")
        storage = await self._storage(job_id)
        media = codec.MEDIA_TYPES.get(record.format or "", "application/octet-stream")
        return ItemResult(record, media, storage.iter_bytes(record.name))

    async def item_source(self, job_id: str, index: int, *,
                          owner: str | None = None) -> ItemSource:
        """An upload's input as it was uploaded (so a page shows the original on any device).
        Only uploads: another job's inputs are the caller's own paths or URLs, and the server
        does not read them back to anyone."""
        snapshot = await self.get(job_id, owner=owner)
        if snapshot["kind"] != "upload":
            raise NotFound("only an upload's inputs are served", code="no_source")
        folder = self.jobs_dir / job_id
        found = await asyncio.to_thread(_spooled, folder, index)
        if found is None:
            raise NotFound(f"job {job_id} has no item {index}", code="item_not_found")
        path, name, size, head = found
        media = codec.MEDIA_TYPES.get(codec.sniff(head) or "", "application/octet-stream")
        return ItemSource(name, media, size, _read_upto(path, size))

    async def manifest(self, job_id: str, *, owner: str | None = None) -> ManifestBytes:
        await self.get(job_id, owner=owner)
        path = self.jobs_dir / job_id / MANIFEST
        size = await asyncio.to_thread(_size, path)
        return ManifestBytes(size, _read_upto(path, size))

    async def results(self, job_id: str, *, owner: str | None = None) -> Iterator[bytes]:
        """A zip of the outputs of the items succeeded so far (the manifest as it is now),
        stored uncompressed with sizes and CRCs from the manifest: never built in memory."""
        from stream_zip import NO_COMPRESSION_64, stream_zip

        await self.get(job_id, owner=owner)
        storage = await self._storage(job_id)
        path = self.jobs_dir / job_id / MANIFEST
        size = await asyncio.to_thread(_size, path)

        def members() -> Iterator[Any]:
            seen: set[str] = set()  # one member per name, whatever an old manifest holds
            indices: set[int] = set()  # a duplicate record (the job index ignores it too)
            for _, record in read_manifest(path, upto=size):
                if not record.succeeded or record.name is None or record.index in indices:
                    continue
                indices.add(record.index)
                when = datetime.fromtimestamp(record.finished_at or time.time())
                method = NO_COMPRESSION_64(record.bytes, record.crc32)
                member = zip_member(record.name, seen)
                yield member, when, 0o644, method, storage.iter_bytes(record.name)

        return stream_zip(members())


def _event_key(snapshot: dict[str, Any]) -> tuple[Any, ...]:
    return (
        snapshot["state"],
        snapshot["reason"],
        snapshot["total"],
        snapshot["listing"],
        tuple(snapshot["counts"].values()),
    )


def _spooled(folder: Path, index: int) -> tuple[Path, str, int, bytes] | None:
    """Item ``index``'s spooled file (path, name, size, first bytes), or None; only a file
    inside the job's own ``inputs/`` folder."""
    if not 0 <= index < 1 << 31:  # past any list (islice refuses more than sys.maxsize)
        return None
    try:
        with open(folder / INPUTS, "rb") as f:  # read only: an upload's list is written once
            line = next(itertools.islice(f, index, None), b"")
    except FileNotFoundError:
        return None
    if not line.endswith(b"\n"):
        return None
    source, _ = json.loads(line)
    path = Path(source).resolve()
    if not path.is_relative_to((folder / "inputs").resolve()) or not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(64)
    return path, path.name, path.stat().st_size, head


def _size(path: Any) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_upto(path: Any, size: int) -> Iterator[bytes]:
    if size == 0:
        return
    with open(path, "rb") as f:
        left = size
        while left > 0 and (block := f.read(min(CHUNK, left))):
            left -= len(block)
            yield block
