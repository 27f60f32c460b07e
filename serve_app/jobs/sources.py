"""Job inputs: the item list on disk, URI checks, fetching bytes, listing a prefix lazily.

Inputs are local paths, ``file://``, ``http(s)://`` or any fsspec URI whose library is
installed (``s3://``, ``gs://``). Remote fetches refuse private, loopback, link-local and
otherwise non-global addresses unless ``allow_private`` is set: the host is resolved and
every address it resolves to is checked, at submission and again at every fetch and redirect
hop. Jobs submitted over HTTP read local files only inside allowed roots.

The item list (``inputs.jsonl``, one ``[source, name]`` array a line) lives in the job's
folder; the job keeps only the byte offset of each line in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from serve_app.errors import InvalidRequest, NotFound, Overloaded, PayloadTooLarge
from serve_app.jobs.storage import is_local, local_path, within

INPUTS = "inputs.jsonl"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
MAX_REDIRECTS = 5
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


class PrivateAddress(InvalidRequest):
    default_code = "private_address"


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


# --------------------------------------------------------------------------- checks


def scheme_of(uri: str) -> str:
    return "file" if is_local(uri) else uri.split("://", 1)[0].lower()


def check_address(address: str, allow_private: bool) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if allow_private or (ip.is_global and not ip.is_multicast):
        return
    raise PrivateAddress(
        f"refusing to fetch from {address}: private, loopback, link-local or reserved address"
    )


def resolve_host(host: str, port: int, allow_private: bool) -> list[str]:
    """Every address ``host`` resolves to, each checked; raises ``PrivateAddress``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceUnavailable(f"cannot resolve {host!r}: {exc}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    for address in addresses:
        check_address(address, allow_private)
    return addresses


def check_url(url: str, allow_private: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"not an http(s) URL: {url!r}", code="invalid_uri")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    resolve_host(parts.hostname, port, allow_private)


def check_input(uri: str, *, allow_private: bool, local_roots: list[Path] | None) -> None:
    """Refuse, at submission, an input that could never be read (400).

    ``local_roots`` limits local paths and restricts other schemes to object stores
    (``None``: a trusted caller, such as a Ray job, may read anything).
    """
    scheme = scheme_of(uri)
    if scheme == "file":
        path = local_path(uri)
        if not path.is_absolute():
            raise InvalidRequest(f"local inputs need an absolute path: {uri!r}", code="invalid_uri")
        if local_roots is not None and not within(path, local_roots):
            raise InvalidRequest(
                f"{uri!r} is outside the folders this server reads jobs from",
                code="forbidden_path",
            )
    elif scheme in ("http", "https"):
        check_url(uri, allow_private)
    else:
        if local_roots is not None and scheme not in OBJECT_STORES:
            # Other fsspec protocols (ftp, sftp, memory, ...) could reach private hosts or
            # server state: only object stores are offered to HTTP clients.
            raise InvalidRequest(f"cannot read {scheme}:// URIs here", code="invalid_uri")
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as exc:
            raise InvalidRequest(f"cannot read {scheme}:// URIs here: {exc}", code="invalid_uri") from None


# --------------------------------------------------------------------------- reading


async def fetch(
    uri: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool,
    local_roots: list[Path] | None = None,
) -> bytes:
    """The bytes of one input. Permanent problems raise 4xx errors, transient ones
    ``SourceUnavailable`` (503)."""
    scheme = scheme_of(uri)
    if scheme in ("http", "https"):
        return await _fetch_http(uri, max_bytes, timeout_s, allow_private)
    if scheme == "file":
        check_input(uri, allow_private=allow_private, local_roots=local_roots)
        return await asyncio.to_thread(_read_local, local_path(uri), max_bytes)
    if local_roots is not None:
        check_input(uri, allow_private=allow_private, local_roots=local_roots)
    return await asyncio.to_thread(_read_fsspec, uri, max_bytes)


def _too_large(uri: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{uri} is larger than {max_bytes} bytes", max_bytes=max_bytes)


def _read_local(path: Path, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise NotFound(f"input {path} does not exist", code="source_not_found") from None
    except PermissionError:
        raise InvalidRequest(f"input {path} is not readable", code="source_forbidden") from None
    if len(data) > max_bytes:
        raise _too_large(str(path), max_bytes)
    return data


def _read_fsspec(uri: str, max_bytes: int) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise NotFound(f"input {uri} does not exist", code="source_not_found") from None
    except PermissionError as exc:
        raise InvalidRequest(f"input {uri} is not readable: {exc}", code="source_forbidden") from None
    except OSError as exc:
        raise SourceUnavailable(f"reading {uri} failed: {exc}") from None
    if len(data) > max_bytes:
        raise _too_large(uri, max_bytes)
    return data


async def _fetch_http(url: str, max_bytes: int, timeout_s: float, allow_private: bool) -> bytes:
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await asyncio.to_thread(check_url, url, allow_private)
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    _check_status(url, response.status_code)
                    return await _read_limited(url, response, max_bytes)
            except httpx.TransportError as exc:
                raise SourceUnavailable(f"fetching {url} failed: {exc!r}") from None
        raise InvalidRequest(f"{url}: more than {MAX_REDIRECTS} redirects", code="fetch_failed")


def _check_status(url: str, status: int) -> None:
    if status < 400:
        return
    if status == 404 or status == 410:
        raise NotFound(f"{url} answered {status}", code="source_not_found")
    if status in (408, 425, 429) or status >= 500:
        raise SourceUnavailable(f"{url} answered {status}")
    raise InvalidRequest(f"{url} answered {status}", code="fetch_failed")


async def _read_limited(url: str, response: Any, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(url, max_bytes)
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(url, max_bytes)
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
