"""The manifest: JSON Lines, one ``ManifestRecord`` per finished item, the job's durable memory.

``ManifestRecord`` is the one definition of a record: the scheduler writes it, the job's
index, the item pages, ``results.zip`` and the Ray-job runner read it back.

Exactly once, also when the disk fills: the writer holds an ``O_APPEND`` descriptor and
writes each record as one whole line in one ``os.write``, then fsyncs it. A write that fails
or comes up short is cut back (``ftruncate``) to the last good offset before the error goes
up, so the item is retried later without a partial line left behind to glue onto the next
record. A process killed mid-write leaves at most one torn line at the end; opening a
manifest for appending cuts it off (its item was not recorded and runs again). One writer at
a time: the writer holds an exclusive ``flock`` for its whole life, which the kernel releases
when the process dies, so a restarted actor or a second ``run`` on the same output cannot
interleave lines.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.errors import Conflict

MANIFEST = "manifest.jsonl"


class ItemError(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    code: str
    message: str
    stage: str | None = None


class ItemOutcome(BaseModel):
    """A finished item as ``item.py`` hands it on once it is written: a ``ManifestRecord``
    but ``index``, ``status`` and ``finished_at``, which ``record`` adds. ``job.ITEM_FIELDS``
    (an item page's fields) is derived from these."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    source: str = Field(description="The input as the client named it (URI or upload filename).")
    name: str | None = None
    error: ItemError | None = None
    attempts: int = 1
    timings: dict[str, float] = Field(default_factory=dict)
    bytes: int | None = None
    sha256: str | None = None
    crc32: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    faces: int | None = None
    # The restored faces in the output: [x, y, width, height] in its pixels.
    face_boxes: list[tuple[int, int, int, int]] | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None

    def record(self, index: int) -> ManifestRecord:
        return ManifestRecord(
            index=index,
            status="succeeded" if self.succeeded else "failed",
            finished_at=round(time.time(), 3),
            **dict(self),
        )


class ManifestRecord(ItemOutcome):
    """One finished item. ``name`` is the output's name inside the job's output storage."""

    index: int = Field(ge=0)
    status: Literal["succeeded", "failed"]
    finished_at: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def line(self) -> bytes:
        # Index and status first, as the manifest always began: people read these files.
        fields = self.model_dump(mode="json")
        first = {"index": fields.pop("index"), "status": fields.pop("status")}
        # UTF-8 as written, not \u escapes: names stay readable (what pydantic's dump wrote).
        line = json.dumps({**first, **fields}, separators=(",", ":"), ensure_ascii=False)
        return line.encode() + b"\n"


OUTCOME_FIELDS = frozenset(ItemOutcome.model_fields)


class ManifestWriter:
    """Appends records to one manifest file; ``append`` returns the record's byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise Conflict("the manifest is being written by another process",
                           code="manifest_locked") from None
        self._size = self._cut_torn_tail()

    def _cut_torn_tail(self) -> int:
        """The size after cutting anything past the last newline (a torn, unrecorded line)."""
        size = os.fstat(self._fd).st_size
        pos, keep = size, 0
        while pos > 0:
            step = min(4096, pos)
            pos -= step
            block = os.pread(self._fd, step, pos)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        if keep != size:
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
        return keep

    def append(self, record: ManifestRecord) -> int:
        line = record.line()
        with self._lock:
            if self._fd < 0:
                raise ValueError("the manifest writer is closed")
            offset = self._size
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, "short write to the manifest")
                os.fsync(self._fd)
            except BaseException:
                # Whatever part of the line reached the file goes: the item stays unrecorded.
                os.ftruncate(self._fd, offset)
                raise
            self._size = offset + written
        return offset

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(line: bytes) -> ManifestRecord | None:
    try:
        return ManifestRecord.model_validate_json(line)
    except ValidationError:
        return None


def read_manifest(path: Path, upto: int | None = None) -> Iterator[tuple[int, ManifestRecord]]:
    """``(offset, record)`` for every complete line (up to byte ``upto``); a torn last line
    and lines that are not records are skipped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        offset = 0
        for line in f:
            start, offset = offset, offset + len(line)
            if (upto is not None and offset > upto) or not line.endswith(b"\n"):
                break
            record = _parse(line)
            if record is not None:
                yield start, record


def read_record(path: Path, offset: int) -> ManifestRecord:
    with open(path, "rb") as f:
        f.seek(offset)
        record = _parse(f.readline())
    if record is None:
        raise ValueError(f"no manifest record at offset {offset}")
    return record
