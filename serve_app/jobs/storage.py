"""Output storage: a local folder, ``file://`` or any fsspec URI (``s3://``, ``gs://``).

Outputs are written whole or not at all: locally to a temporary name in the same folder,
fsynced, then renamed over the final name (so a re-run of an item replaces its earlier
output atomically); on object stores with a single PUT, which is atomic by nature.
Free space is known for local storage only; remote stores report ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from serve_app.errors import InsufficientStorage, InvalidRequest

LOGGER = logging.getLogger(__name__)
CHUNK = 256 * 1024


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The path of a local or ``file://`` URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return Path(uri).expanduser()


class Storage:
    """One output folder (or prefix) addressed by a URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") if "://" in uri else str(local_path(uri))
        self.local = is_local(uri)
        self._fs: Any = None
        self._root = ""
        if self.local:
            self.path = local_path(uri)
        else:
            import fsspec

            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.uri)
            except (ImportError, ValueError) as exc:
                raise InvalidRequest(f"output storage {uri!r} is not usable: {exc}") from None

    def prepare(self) -> None:
        if self.local:
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            with contextlib.suppress(Exception):  # object stores have no folders
                self._fs.makedirs(self._root, exist_ok=True)

    def uri_of(self, name: str) -> str:
        return str(self.path / name) if self.local else f"{self.uri}/{name}"

    # ------------------------------------------------------------------ writing

    def write_atomic(self, name: str, data: bytes) -> str:
        """Write ``data`` as ``name``; readers see the old file or the whole new one."""
        if not self.local:
            self._fs.pipe_file(f"{self._root}/{name}", data)
            return self.uri_of(name)
        final = self.path / name
        # A name may hold folders (an upload's ``day1/x.png``): the temporary file sits
        # beside the final one, so the rename stays on one file system.
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return str(final)

    def upload(self, local: Path, name: str) -> None:
        """Copy a local file (streamed, not read into memory) into this storage."""
        if self.local:
            shutil.copyfile(local, self.path / name)
        else:
            self._fs.put_file(str(local), f"{self._root}/{name}")

    def remove_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind; returns how many."""
        if not self.local or not self.path.is_dir():
            return 0
        count = 0
        for folder, _, files in os.walk(self.path):  # outputs may sit in folders
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                        count += 1
        return count

    # ------------------------------------------------------------------ reading

    def open(self, name: str) -> IO[bytes]:
        if self.local:
            return open(self.path / name, "rb")  # noqa: SIM115 - the caller closes it
        return self._fs.open(f"{self._root}/{name}", "rb")

    def iter_bytes(self, name: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with self.open(name) as f:
            while block := f.read(chunk):
                yield block

    def exists(self, name: str) -> bool:
        if self.local:
            return (self.path / name).is_file()
        return bool(self._fs.exists(f"{self._root}/{name}"))

    # ------------------------------------------------------------------ space

    def free_bytes(self) -> int | None:
        """Free bytes where the outputs go (local storage), ``None`` when unknown."""
        if not self.local:
            return None
        probe = self.path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def check_space(self, needed: int, floor: int) -> None:
        """Raise ``InsufficientStorage`` (507) unless ``needed`` bytes fit above ``floor``."""
        free = self.free_bytes()
        if free is None or free - floor >= needed:
            return
        # The answer names no figures of the disk: they are the server's business.
        LOGGER.warning("free space %d bytes: %d needed above the floor of %d", free, needed, floor)
        raise InsufficientStorage(
            "not enough free space on the server's storage for this job; retry later or "
            "send fewer or smaller images",
        )


