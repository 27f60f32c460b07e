"""Job inputs: the item list on disk, fetching bytes (bounded), listing a prefix lazily.

Which inputs may be read is the gate's decision (``serve_app.jobs.gate``): it is asked at
submission and again at every fetch and redirect hop (symlinks and DNS may change). A fetch
is bounded: bytes counted on the wire (encoded bodies refused), at most ``max_bytes``, one
deadline for the whole fetch (a source trickling a byte at a time is cut), and the scheduler
caps the fetches in flight per job.

The item list (``inputs.jsonl``, one ``[source, name]`` array a line) lives in the job's
folder; the job keeps only the byte offset of each line in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from serve_app.errors import InvalidRequest, NotFound, Overloaded, PayloadTooLarge
from serve_app.jobs.gate import Gate
from serve_app.jobs.storage import is_local, local_path

LOGGER = logging.getLogger(__name__)

INPUTS = "inputs.jsonl"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
MAX_REDIRECTS = 5

class SourceUnavailable(Overloaded):
    """A transient failure to read an input (network error, 5xx): the item is retried."""

    default_code = "source_unavailable"


# --------------------------------------------------------------------------- the item list


class InputList:
    """``inputs.jsonl``: append items, read item ``i`` by its line offset."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offsets = array("q")

    def load(self) -> int:
        """Index the complete lines (a torn last line is cut off); returns the count."""
        self.offsets = array("q")
        if not self.path.exists():
            return 0
        pos = 0
        with open(self.path, "r+b") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    f.truncate(pos)
                    break
                self.offsets.append(pos)
                pos += len(line)
        return len(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets)

    def append(self, items: list[tuple[str, str]]) -> None:
        if not items:
            return
        with open(self.path, "ab") as f:
            pos = f.seek(0, os.SEEK_END)
            for source, name in items:
                line = json.dumps([source, name], ensure_ascii=False).encode() + b"\n"
                f.write(line)
                self.offsets.append(pos)
                pos += len(line)
            f.flush()
            os.fsync(f.fileno())

    def get(self, index: int) -> tuple[str, str]:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            source, name = json.loads(f.readline())
        return source, name


def write_inputs(path: Path, items: list[tuple[str, str]]) -> None:
    """Write a whole item list atomically (temporary name, then rename)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for source, name in items:
            f.write(json.dumps([source, name], ensure_ascii=False).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reading


def scheme_of(uri: str) -> str:
    return "file" if is_local(uri) else uri.split("://", 1)[0].lower()


async def fetch(uri: str, *, max_bytes: int, timeout_s: float, gate: Gate | None) -> bytes:
    """The bytes of one input, within ``timeout_s`` for the whole fetch. Every place passes
    ``gate`` again here (symlinks and DNS may have changed since submission); ``None`` is a
    trusted caller (a Ray job), which may read anything. Permanent problems raise 4xx errors,
    transient ones ``SourceUnavailable`` (503)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(uri, max_bytes, timeout_s, gate)
    except TimeoutError:
        raise SourceUnavailable(f"reading the input took longer than {timeout_s:g}s",
                                code="fetch_timeout") from None


async def _fetch(uri: str, max_bytes: int, timeout_s: float, gate: Gate | None) -> bytes:
    if gate is not None:
        uri = (await asyncio.to_thread(gate.input, uri)).uri
    scheme = scheme_of(uri)
    if scheme in ("http", "https"):
        return await _fetch_http(uri, max_bytes, timeout_s, gate)
    if scheme == "file":
        return await asyncio.to_thread(_read_local, local_path(uri), max_bytes)
    return await asyncio.to_thread(_read_fsspec, uri, max_bytes)


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the input is larger than {max_bytes} bytes", max_bytes=max_bytes)


def _read_local(path: Path, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise NotFound("the input does not exist", code="source_not_found") from None
    except PermissionError:
        raise InvalidRequest("the input is not readable", code="source_forbidden") from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


def _read_fsspec(uri: str, max_bytes: int) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise NotFound("the input does not exist", code="source_not_found") from None
    except PermissionError:
        raise InvalidRequest("the input is not readable", code="source_forbidden") from None
    except OSError as exc:
        LOGGER.info("reading %s failed: %s", uri, exc)
        raise SourceUnavailable("reading the input failed") from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


async def _fetch_http(url: str, max_bytes: int, timeout_s: float, gate: Gate | None) -> bytes:
    import httpx

    # Bytes are counted as they come off the wire, undecoded: a compressed body could
    # expand far past max_bytes (an 809-byte brotli body makes 1 GiB), so it is refused.
    headers = {"Accept-Encoding": "identity"}
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False,
                                 headers=headers) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target, extra, extensions = url, {}, {}
            if gate is not None:
                pinned = await asyncio.to_thread(gate.pin, url)
                target, extra, extensions = pinned.url, pinned.headers, pinned.extensions
            try:
                async with client.stream("GET", target, headers=extra,
                                         extensions=extensions) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    _check_status(response.status_code)
                    return await _read_limited(response, max_bytes)
            except httpx.TransportError as exc:
                LOGGER.info("fetching %s failed: %r", url, exc)
                raise SourceUnavailable("fetching the input failed") from None
        raise InvalidRequest(f"more than {MAX_REDIRECTS} redirects", code="fetch_failed")


def _check_status(status: int) -> None:
    if status < 400:
        return
    if status == 404 or status == 410:
        raise NotFound(f"the source answered {status}", code="source_not_found")
    if status in (408, 425, 429) or status >= 500:
        raise SourceUnavailable(f"the source answered {status}")
    raise InvalidRequest(f"the source answered {status}", code="fetch_failed")


async def _read_limited(response: Any, max_bytes: int) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise InvalidRequest(
            f"the source sent a {encoding!r}-encoded body; only unencoded bodies are read",
            code="content_encoding_refused",
        )
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- listing


def iter_prefix(uri: str) -> Iterator[str]:
    """Image files under a folder or bucket prefix, lazily, in a stable sorted order
    (one folder's entries are held at a time), so a re-listing yields the same indices."""
    if is_local(uri):
        yield from _walk_local(local_path(uri))
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    protocol = uri.split("://", 1)[0]
    for folder, dirs, files in fs.walk(root):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                yield f"{protocol}://{folder.rstrip('/')}/{name}"


def _walk_local(folder: Path) -> Iterator[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                yield from _walk_local(Path(entry.path))
            elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                yield entry.path
