"""API keys: who is calling (a ``Principal``), from a bearer key checked against stored hashes.

Only SHA-256 digests of keys are stored. A key is 32 random bytes (``new_key``), so its
digest cannot be reversed or guessed; slow password hashes (bcrypt, argon2) protect
low-entropy secrets and would cost every request milliseconds of CPU, an easy way to
overload the server. Digests are compared with ``hmac.compare_digest`` against every stored
entry, so timing says nothing about which one matched or how much of it.

A key file has one ``NAME ROLE sha256:HEX`` line per key (``#`` comments). Several lines may
share a name: that is how a key rotates (add the new one, move clients, remove the old
line); a name keeps its jobs and presets across rotations. The file is re-read when it
changes. No HTTP here: ``serve_app.api.guard`` applies this to requests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LOGGER = logging.getLogger(__name__)

Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
KEY_PREFIX = "pe_"
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})\Z")


@dataclass(frozen=True)
class Principal:
    """The caller behind a valid key. ``None`` in its place means keys are off, or the
    caller is a trusted handle inside the cluster."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class KeyEntry:
    name: str
    role: Role
    digest: bytes


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_line(name: str, role: Role, key: str) -> str:
    """The stored line for ``key`` (its hash, never the key)."""
    check_name(name)
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    return f"{name} {role} sha256:{digest(key).hex()}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError("key names are 1-64 letters, digits, '.', '_' or '-', first a letter or digit")
    return name


def parse_lines(text: str, source: str) -> list[KeyEntry]:
    """Entries of a key file's text; a malformed line raises ``ValueError`` naming it."""
    entries: list[KeyEntry] = []
    roles: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        match = _DIGEST_RE.match(parts[2]) if len(parts) == 3 else None
        if match is None or parts[1] not in ROLES or not NAME_RE.match(parts[0]):
            raise ValueError(f"{source}:{number}: expected 'NAME user|admin sha256:HEX'")
        name, role = parts[0], parts[1]
        if roles.setdefault(name, role) != role:
            raise ValueError(f"{source}:{number}: {name!r} has two roles")
        entries.append(KeyEntry(name, role, bytes.fromhex(match.group(1))))  # type: ignore[arg-type]
    return entries


class KeyRing:
    """The configured keys: a file (re-read when it changes) plus an environment variable."""

    def __init__(self, keys_file: Path | None = None, env_var: str | None = None) -> None:
        self.keys_file = keys_file
        self._env = parse_lines(os.environ.get(env_var, ""), f"${env_var}") if env_var else []
        self._file: list[KeyEntry] = []
        self._stamp: tuple[int, int] | None = None
        self._mutex = threading.Lock()

    def entries(self) -> list[KeyEntry]:
        return self._env + self._file_entries()

    def _file_entries(self) -> list[KeyEntry]:
        if self.keys_file is None:
            return []
        try:
            st = self.keys_file.stat()
        except OSError:
            LOGGER.error("API keys file is missing; only keys from the environment work")
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        with self._mutex:
            if stamp != self._stamp:
                try:
                    self._file = parse_lines(self.keys_file.read_text(), str(self.keys_file))
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    # Keep the last good set: a half-edited file must not lock everyone out.
                    LOGGER.error("API keys file not (re)loaded: %s", exc)
                self._stamp = stamp
            return self._file

    def authenticate(self, key: str) -> Principal | None:
        presented = digest(key)
        found: KeyEntry | None = None
        for entry in self.entries():  # no early exit: the time does not depend on the match
            if hmac.compare_digest(entry.digest, presented):
                found = entry
        return Principal(found.name, found.role) if found else None


def append_key(path: Path, name: str, role: Role) -> tuple[str, int]:
    """Make a key for ``name``, append its hash line to ``path`` (created 0600); return the
    key (shown once, never stored) and how many keys ``name`` had before."""
    check_name(name)
    existing = parse_lines(path.read_text(), str(path)) if path.exists() else []
    prior = [e for e in existing if e.name == name]
    if prior and prior[0].role != role:
        raise ValueError(f"{name!r} already has role {prior[0].role!r}")
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        if f.tell() > 0 and not path.read_bytes().endswith(b"\n"):
            f.write("\n")
        f.write(key_line(name, role, key) + "\n")
    return key, len(prior)
