"""One job's compact in-memory state, rebuilt from its folder at any time.

A job folder holds ``job.json`` (the spec), ``state.json`` (state, reason, whether listing
ended), ``inputs.jsonl`` (the items), ``manifest.jsonl`` (finished items) and, by default,
``outputs/``. In memory a job keeps one status byte and two 8-byte offsets per item (into
``inputs.jsonl`` and into the manifest), never the items themselves: memory grows by
17 bytes an item, and not at all with what the items are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from serve_app.errors import Conflict
from serve_app.jobs.manifest import (
    MANIFEST,
    OUTCOME_FIELDS,
    ManifestRecord,
    ManifestWriter,
    read_manifest,
    read_record,
)
from serve_app.jobs.naming import OutputNames, source_path
from serve_app.jobs.sources import INPUTS, InputList
from serve_app.jobs.spec import (
    ACTIVE,
    FAILED,
    ITEM_STATES,
    JOB_JSON,
    PENDING,
    RUNNING,
    STATE_JSON,
    SUCCEEDED,
    TERMINAL,
    TRANSITIONS,
    JobSpec,
    read_json,
    reason_code,
    reason_text,
    write_json_atomic,
)
from serve_app.jobs.storage import Storage

LOGGER = logging.getLogger(__name__)

# An item page's fields from its record (beside its index and status): the outcome's, less
# crc32, which is there for results.zip (members stored without buffering them).
ITEM_FIELDS = OUTCOME_FIELDS - {"crc32"}
RATE_WINDOW = 256  # finish times kept for throughput
_PENDING_BYTE = bytes([PENDING])

class Job:
    def __init__(self, spec: JobSpec, folder: Path) -> None:
        self.spec = spec
        self.id = spec.job_id
        self.folder = Path(folder)
        self.storage = Storage(spec.output)
        # Outputs in a folder shared with other (earlier) jobs carry the job's id, so that no
        # job's outputs replace another's; in its own folder the index makes names unique.
        own = self.storage.local and Path(spec.output).resolve().is_relative_to(
            self.folder.resolve())
        self.name_prefix = "" if own else f"{self.id}_"
        self.inputs = InputList(self.folder / INPUTS)
        self.names = OutputNames(self._relatives)  # rebuilt from inputs.jsonl after a restart
        self.manifest_path = self.folder / MANIFEST
        self.state: str = "queued"
        self.reason: str | None = None  # a code of spec.REASONS
        self.listed = spec.kind != "prefix"
        self.loaded = False
        self.status = bytearray()
        self.record_at = array("q")
        self.counts = [0, 0, 0, 0]  # by item state
        self.cursor = 0
        self.inflight = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writer: ManifestWriter | None = None
        self._writer_lock = threading.Lock()
        self.finish_times: deque[float] = deque(maxlen=RATE_WINDOW)
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.paused_at: float | None = None  # when it last went paused (paused_ttl_s)
        self.updated_at = time.time()
        self.last_dispatch = 0.0
        self.version = 0
        self._changed: asyncio.Event | None = None
        # The callback's delivery record (webhooks.deliver), None when the job names none.
        self.callback: dict[str, Any] | None = (
            {"url": spec.callback_url, "state": "pending", "attempts": 0}
            if spec.callback_url else None
        )
        self.on_end: Callable[[Job], None] | None = None  # called once it reaches a final state

    # ------------------------------------------------------------------ folder

    @classmethod
    def create(cls, spec: JobSpec, folder: Path) -> Job:
        job = cls(spec, folder)
        job.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(job.folder / JOB_JSON, spec.model_dump(mode="json"))
        job.save_state()
        job.load()
        return job

    @classmethod
    def open(cls, folder: Path) -> Job:
        """A job read back from its folder; finished jobs stay summaries until asked."""
        spec = JobSpec.model_validate(read_json(folder / JOB_JSON))
        job = cls(spec, folder)
        try:
            saved = read_json(folder / STATE_JSON)
        except FileNotFoundError:
            saved = {}
        job.state = saved.get("state", "queued")
        job.reason = saved.get("reason")
        job.listed = saved.get("listed", job.listed)
        job.started_at = saved.get("started_at")
        job.finished_at = saved.get("finished_at")
        job.paused_at = saved.get("paused_at")
        if job.state == "paused" and job.paused_at is None:  # a state.json of before
            job.paused_at = saved.get("updated_at", spec.created_at)
        job.updated_at = saved.get("updated_at", spec.created_at)
        job.callback = saved.get("callback", job.callback)
        if job.state in TERMINAL:
            job.counts = list(saved.get("counts", job.counts))
        else:
            job.load()
        return job

    def load(self) -> None:
        """Index inputs and the manifest: what is finished stays finished."""
        n = self.inputs.load()
        self.status = bytearray(n)
        self.record_at = array("q", [-1]) * n
        self.counts = [n, 0, 0, 0]
        duplicates = 0
        for offset, record in read_manifest(self.manifest_path):
            index = record.index
            if index >= n:
                continue
            if self.status[index] != PENDING:
                duplicates += 1
                continue
            code = SUCCEEDED if record.succeeded else FAILED
            self.status[index] = code
            self.record_at[index] = offset
            self.counts[PENDING] -= 1
            self.counts[code] += 1
        if duplicates:
            LOGGER.error("job %s: %d duplicate manifest records ignored", self.id, duplicates)
        self.cursor = 0
        self.loaded = True

    def ensure_loaded(self) -> None:
        if not self.loaded:
            self.load()

    def save_state(self) -> None:
        write_json_atomic(
            self.folder / STATE_JSON,
            {
                "state": self.state,
                "reason": self.reason,
                "listed": self.listed,
                "counts": self.counts,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "paused_at": self.paused_at,
                "updated_at": self.updated_at,
                "callback": self.callback,
            },
        )

    def open_writer(self) -> ManifestWriter:
        with self._writer_lock:
            if self.writer is None:
                self.writer = ManifestWriter(self.manifest_path)
            return self.writer

    def close(self) -> None:
        with self._writer_lock:
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    # ------------------------------------------------------------------ items

    @property
    def total(self) -> int:
        return len(self.status) if self.loaded else sum(self.counts)

    @property
    def done(self) -> int:
        return self.counts[SUCCEEDED] + self.counts[FAILED]

    @property
    def limit(self) -> int:
        return self.spec.max_inflight or 1 << 30

    def add_items(self, count: int) -> None:
        """``count`` more items were appended to ``inputs.jsonl`` (lazy listing)."""
        self.status.extend(bytes(count))
        self.record_at.extend(array("q", [-1]) * count)
        self.counts[PENDING] += count
        self.touch()

    def has_pending(self) -> bool:
        return self.status.find(_PENDING_BYTE, self.cursor) >= 0

    def take(self) -> int | None:
        """The next pending item, now running; None when there is none."""
        index = self.status.find(_PENDING_BYTE, self.cursor)
        if index < 0:
            return None
        self.cursor = index + 1
        self._move(index, RUNNING)
        self.inflight += 1
        self.last_dispatch = time.monotonic()
        if self.started_at is None:
            self.started_at = time.time()
        return index

    def release(self, index: int) -> None:
        """An abandoned item goes back to pending; it runs again later."""
        if self.status[index] == RUNNING:
            self._move(index, PENDING)
            self.cursor = min(self.cursor, index)
        self.inflight -= 1
        self.touch()

    def finish(self, index: int, succeeded: bool, offset: int) -> None:
        self._move(index, SUCCEEDED if succeeded else FAILED)
        self.record_at[index] = offset
        self.inflight -= 1
        self.finish_times.append(time.monotonic())
        self.touch()

    def _move(self, index: int, code: int) -> None:
        self.counts[self.status[index]] -= 1
        self.status[index] = code
        self.counts[code] += 1

    def is_complete(self) -> bool:
        return self.listed and self.loaded and self.done == self.total and self.inflight == 0

    def final_state(self) -> str:
        if self.counts[FAILED] == 0 and self.total > 0:
            return "completed"
        return "failed" if self.counts[SUCCEEDED] == 0 else "partial"

    def record(self, index: int) -> ManifestRecord | None:
        self.ensure_loaded()
        if not 0 <= index < len(self.status) or self.record_at[index] < 0:
            return None
        return read_record(self.manifest_path, self.record_at[index])

    def items(self, offset: int, limit: int, status: str | None) -> dict[str, Any]:
        """A page of items (reads their manifest records); ``status`` filters."""
        self.ensure_loaded()
        if status is None:
            indices = range(offset, min(offset + limit, len(self.status)))
            matching = len(self.status)
        else:
            code = bytes([ITEM_STATES.index(status)])
            matching = self.status.count(code)
            indices = _nth_matches(self.status, code, offset, limit)
        rows = []
        for i in indices:
            row: dict[str, Any] = {"index": i, "status": ITEM_STATES[self.status[i]]}
            if self.record_at[i] >= 0:
                rec = read_record(self.manifest_path, self.record_at[i])
                row.update(rec.model_dump(include=ITEM_FIELDS))
            else:
                row["source"] = self.source_of(i)
            rows.append(row)
        return {"items": rows, "offset": offset, "limit": limit, "total": matching}

    def output_name(self, index: int, fmt: str) -> str:
        """Item ``index``'s output name (the client's name, kept where safe: naming.py);
        the same after a restart, as names go in index order."""
        self.names.assign(len(self.inputs), complete=self.listed)
        return self.name_prefix + self.names.name(index, fmt)

    def _relatives(self, start: int, stop: int) -> Iterator[str]:
        """Items ``start``..``stop``'s relative source paths, read in one pass."""
        if start >= stop:
            return
        with open(self.inputs.path, "rb") as f:
            f.seek(self.inputs.offsets[start])
            for _ in range(stop - start):
                source, name = json.loads(f.readline())
                yield source_path(self.spec.kind, source, name, self.spec.input_prefix)

    def source_of(self, index: int) -> str:
        """The input as the client named it: its URI, or an upload's filename (never the
        server path it was spooled to)."""
        source, name = self.inputs.get(index)
        return name if self.spec.kind == "upload" else source

    # ------------------------------------------------------------------ state

    def set_state(self, state: str, reason: str | None = None) -> None:
        """``reason``: a code of ``spec.REASONS``."""
        self.state = state
        self.reason = reason
        self.paused_at = time.time() if state == "paused" else None
        if state in TERMINAL:
            self.finished_at = time.time()
        self.touch(state_changed=True)
        try:
            self.save_state()
        except OSError:  # a full disk, say: memory is right, the next change saves again
            LOGGER.exception("job %s: cannot save its state", self.id)
        if state in TERMINAL and self.on_end is not None:
            self.on_end(self)

    def control(self, action: str) -> None:
        target = TRANSITIONS[action].get(self.state)
        if target is None:
            raise Conflict(
                f"job {self.id} is {self.state}; cannot {action} it", code="invalid_state",
                state=self.state,
            )
        if action == "resume" and self.started_at is None:
            target = "queued"
        self.set_state(target, None)

    def touch(self, state_changed: bool = False) -> None:
        self.updated_at = time.time()
        self.version += 1
        if state_changed and self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_state_change(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def throughput(self) -> float | None:
        """Items a second over the last finishes (up to ``RATE_WINDOW``)."""
        times = self.finish_times
        if len(times) < 2:
            return None
        span = max(time.monotonic(), times[-1]) - times[0]
        return (len(times) - 1) / span if span > 0 else None

    def snapshot(self) -> dict[str, Any]:
        total = self.total
        rate = self.throughput() if self.state in ACTIVE else None
        remaining = total - self.done
        eta = remaining / rate if rate and self.listed else None
        return {
            "job_id": self.id,
            "state": self.state,
            "reason": reason_text(self.reason),
            "reason_code": reason_code(self.reason),
            "kind": self.spec.kind,
            "priority": self.spec.priority,
            "owner": self.spec.owner,
            # What the client sent (None: the job's own folder), never the resolved path;
            # a job.json written before requested_output existed echoes as it did then.
            "output": self.spec.requested_output if self.spec.requested_output is not None
            or self.name_prefix == "" else self.spec.output,
            "options": self.spec.options.model_dump(mode="json"),
            "total": total,
            "listing": not self.listed,
            "counts": {name: self.counts[i] for i, name in enumerate(ITEM_STATES)},
            "done": self.done,
            "progress": self.done / total if total else (1.0 if self.state in TERMINAL else 0.0),
            "throughput": rate,
            "eta_s": eta,
            "created_at": self.spec.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
            "callback": dict(self.callback) if self.callback else None,
            "version": self.version,
        }


def _nth_matches(status: bytearray, code: bytes, offset: int, limit: int) -> list[int]:
    out: list[int] = []
    pos, seen = status.find(code), 0
    while pos >= 0 and len(out) < limit:
        if seen >= offset:
            out.append(pos)
        seen += 1
        pos = status.find(code, pos + 1)
    return out
