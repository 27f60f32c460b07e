"""The manifest: JSON Lines, one record per finished item, the job's durable memory.

A record is appended, flushed and fsynced as its item finishes, so a process killed at any
moment leaves at most one torn line at the end. Opening a manifest for appending cuts such a
torn tail off (its item was not recorded and runs again). One writer at a time: the writer
holds an exclusive ``flock`` for its whole life, which the kernel releases when the process
dies, so a restarted actor or a second ``run`` on the same output cannot interleave lines.

Record fields: ``index``, ``source``, ``name`` (output name in the output folder, or null),
``output`` (its full URI, or null), ``status`` (``succeeded``/``failed``), ``error``
(``{"code", "message"}`` or null), ``attempts``, ``timings`` (seconds per stage),
``bytes``, ``sha256`` and ``crc32`` of the output, ``width``, ``height``, ``format``,
``finished_at`` (Unix time).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serve_app.errors import Conflict

MANIFEST = "manifest.jsonl"


class ManifestWriter:
    """Appends records to one manifest file; ``append`` returns the record's byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._f = open(self.path, "a+b")  # noqa: SIM115 - lives as long as the writer
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise Conflict(
                f"{self.path} is being written by another process", code="manifest_locked"
            ) from None
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        f = self._f
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        # Walk back to the last newline; anything after it is a torn, unrecorded line.
        pos, keep = size, 0
        while pos > 0:
            step = min(4096, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        if keep != size:
            f.truncate(keep)
            os.fsync(f.fileno())
        f.seek(0, os.SEEK_END)

    def append(self, record: dict[str, Any]) -> int:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        with self._lock:
            offset = self._f.seek(0, os.SEEK_END)
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
        return offset

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(offset, record)`` for every complete line; a torn last line is skipped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        offset = 0
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                break
            try:
                yield start, json.loads(line)
            except ValueError:
                continue


def read_record(path: Path, offset: int) -> dict[str, Any]:
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline())
