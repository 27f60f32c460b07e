"""Saved custom presets, shared by every ingress replica through one JSON file.

The file lives at ``<jobs.data_dir>/presets.json``. Writers take an exclusive ``flock`` on a
lock file beside it and replace the file atomically (temporary name, then rename), so readers
never see half a file and two replicas never lose each other's update. Readers cache by
modification time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from serve_app.auth import Principal
from serve_app.errors import Conflict, InvalidOption, NotFound
from serve_app.options import BUILTIN_PRESETS, resolve_options

LOGGER = logging.getLogger(__name__)

# Anchored with \Z: "$" would also accept a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
OWNED_DIR = "presets.d"


class PresetCatalog:
    """Built-in presets, global saved ones and each key's own.

    Keys off (or a trusted handle): saved presets are global. Keys on: an admin saves and
    deletes global presets; a user key saves its own (``presets.d/<key name>.json``), sees
    built-in, global and its own (its own win over a global one of the same name), and
    cannot change global ones.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.shared = PresetStore(self.folder / "presets.json")
        self._owned: dict[str, PresetStore] = {}

    def store_for(self, principal: Principal | None) -> PresetStore:
        if principal is None or principal.is_admin:
            return self.shared
        store = self._owned.get(principal.name)
        if store is None:
            store = PresetStore(self.folder / OWNED_DIR / f"{principal.name}.json")
            self._owned[principal.name] = store
        return store

    def for_owner(self, owner: str | None) -> dict[str, dict[str, Any]]:
        """Saved presets a job submitted by ``owner`` may name (an admin's own file stays
        empty: admins save global presets)."""
        if owner is None:
            return self.shared.custom()
        return self.table(Principal(owner, "user"))

    def table(self, principal: Principal | None) -> dict[str, dict[str, Any]]:
        """Saved presets a caller may name (built-in ones are added by ``resolve_options``)."""
        own = self.store_for(principal)
        if own is self.shared:
            return self.shared.custom()
        return {**self.shared.custom(), **own.custom()}

    def listing(self, principal: Principal | None) -> list[dict[str, Any]]:
        own = self.store_for(principal)
        out = self.shared.listing(scope="global")
        if own is not self.shared:
            mine = own.listing(scope="own")
            names = {p["name"] for p in mine}
            out = [p for p in out if p["builtin"] or p["name"] not in names]
            out += [p for p in mine if not p["builtin"]]
        return out


class PresetStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_suffix(".lock")
        self._cache: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._mutex = threading.Lock()

    # ------------------------------------------------------------------ reading

    def custom(self) -> dict[str, dict[str, Any]]:
        """Saved presets by name (a copy)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        with self._mutex:
            if self._cache is not None and self._cache[0] == mtime:
                return dict(self._cache[1])
            data = self._read()
            self._cache = (mtime, data)
            return dict(data)

    def all(self) -> dict[str, dict[str, Any]]:
        """Built-in and saved presets; built-in names cannot be shadowed."""
        return {**self.custom(), **BUILTIN_PRESETS}

    def listing(self, scope: str = "global") -> list[dict[str, Any]]:
        builtin = [
            {"name": n, "builtin": True, "scope": "builtin", "options": o}
            for n, o in BUILTIN_PRESETS.items()
        ]
        custom = [
            {"name": n, "builtin": False, "scope": scope, "options": o}
            for n, o in sorted(self.custom().items())
            if n not in BUILTIN_PRESETS
        ]
        return builtin + custom

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            LOGGER.error("presets file %s is unreadable (%s); ignoring it", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}

    # ------------------------------------------------------------------ writing

    def put(self, name: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Save (or replace) a preset; returns its stored options and whether it is new."""
        self._check_name(name)
        if not isinstance(options, Mapping):
            raise InvalidOption("a preset is a JSON object of options", field="options")
        if "preset" in options:
            raise InvalidOption("a preset cannot name another preset", field="preset")
        # Validate whole, store only what was given, so presets layer under explicit values.
        validated = resolve_options(options).model_dump(mode="json", exclude_unset=True)
        with self._locked():
            data = self._read()
            created = name not in data
            data[name] = validated
            self._write(data)
        return validated, created

    def delete(self, name: str) -> None:
        if name in BUILTIN_PRESETS:
            raise Conflict(f"preset {name!r} is built in and cannot be deleted", code="builtin_preset")
        with self._locked():
            data = self._read()
            if name not in data:
                raise NotFound(f"no saved preset named {name!r}", code="preset_not_found")
            del data[name]
            self._write(data)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidOption(
                "preset names are 1-64 letters, digits, '.', '_' or '-'", field="name"
            )
        if name in BUILTIN_PRESETS:
            raise Conflict(f"preset {name!r} is built in and cannot be replaced", code="builtin_preset")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._mutex, open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
                self._cache = None

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".presets.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
