"""Names that are safe to put on disk: job ids, spooled upload names, output names.

Spooled uploads get a plain ASCII name prefixed with their index (``000003_photo.jpg``): the
server's own working files. Outputs keep the client's name, Unicode included (NFC), and an
upload's relative folder (``day1/IMG_0001.jpg`` -> ``day1/IMG_0001.png``); only what is
unsafe on a common file system is replaced (see ``safe_component``), ``..`` and absolute
paths cannot leave the output root, and names that meet (``x.jpg`` and ``x.png`` both as PNG,
``A.jpg`` and ``a.jpg``) are told apart with a suffix, ``x.png`` then ``x (1).png``, the lower
index keeping the plain name. A name depends only on the items before it in the job's list,
so a resumed job gives every item the name it had (the manifest's exactly-once rule).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_JOB_ID = re.compile(r"^j[0-9]{14}[0-9a-f]{8}$")
MAX_STEM = 80
OUTPUT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "avif": "avif"}

# Characters Windows refuses in names, and control characters (C0, DEL, C1).
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f-\x9f]')
# Device names Windows reserves whatever the extension (``con.txt`` too).
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)$", re.I)
_DRIVE = re.compile(r"^[A-Za-z]:$")
# 255 bytes is the common limit of one name (ext4, APFS, NTFS in UTF-16 units); the stem is
# kept well under it to leave room for " (12)", the extension and the writer's temporary
# name (``.<name>.XXXXXXXX.tmp``).
MAX_STEM_BYTES = 200
MAX_FOLDERS = 16  # folders kept of a relative path: the deepest ones
_IMAGE_SUFFIX = re.compile(r"\.(png|jpe?g|webp|avif|tiff?)$", re.I)


def new_job_id() -> str:
    """Sortable by creation time, unguessable enough not to collide: ``j20250101120000a1b2c3d4``."""
    return "j" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(4)


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


def basename(name: str) -> str:
    """The last component of a path or URI, whichever separator the client used."""
    name = name.split("?", 1)[0].split("#", 1)[0]
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def safe_stem(name: str) -> str:
    """A file stem of ``[A-Za-z0-9._-]`` only, without leading dots; ``image`` if nothing is left."""
    base = unicodedata.normalize("NFKD", basename(name))
    base = base.encode("ascii", "ignore").decode("ascii")
    stem = PurePosixPath(base).stem if "." in base.lstrip(".") else base
    stem = _UNSAFE.sub("_", stem).strip("._-")
    return stem[:MAX_STEM] or "image"


def safe_suffix(name: str) -> str:
    """The lower-case extension (``.jpg``) when it is short and plain, else empty."""
    suffix = PurePosixPath(basename(name)).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def spool_name(index: int, filename: str) -> str:
    """Where upload ``index`` is spooled inside the job's ``inputs/`` folder."""
    return f"{index:06d}_{safe_stem(filename)}{safe_suffix(filename)}"


# --------------------------------------------------------------------------- output names


def _cut(text: str, max_bytes: int) -> str:
    """``text`` shortened to at most ``max_bytes`` of UTF-8, never inside a character."""
    return text.encode()[:max_bytes].decode("utf-8", "ignore")


def safe_component(name: str, max_bytes: int = MAX_STEM_BYTES) -> str:
    """One path component that every common file system accepts, as close to ``name`` as
    that allows: NFC; Windows-reserved and control characters -> ``_``; no leading dot
    (no hidden files, no ``..``); no trailing dots or spaces; ``CON``, ``NUL``... prefixed
    with ``_``; at most ``max_bytes`` of UTF-8; ``_`` if nothing is left."""
    name = _FORBIDDEN.sub("_", unicodedata.normalize("NFC", name)).strip()
    if name.startswith("."):
        name = "_" + name[1:]
    name = _cut(name, max_bytes).rstrip(". ")
    if _RESERVED.match(name.split(".", 1)[0].rstrip(" ")):
        name = "_" + name
    return name or "_"


def relative_parts(name: str) -> list[str]:
    """A client's relative path as components: ``/`` and ``\\`` both separate, empty,
    ``.``, ``..`` and drive (``C:``) components are dropped, so the path stays under the root."""
    parts = [p for p in re.split(r"[/\\]", unicodedata.normalize("NFC", name))
             if p.strip() not in ("", ".", "..")]
    if parts and _DRIVE.match(parts[0]):
        parts = parts[1:]
    return parts


def source_path(kind: str, source: str, name: str, prefix: str | None) -> str:
    """The relative path an item's output is named after: an upload's filename (with the
    folder a browser sends for a dropped folder), a prefix listing's path under the prefix,
    a URI's last component (percent-decoded)."""
    if kind == "upload":
        return name
    if kind == "prefix" and prefix:
        root = prefix.rstrip("/\\")
        if source.startswith(root + "/") or source.startswith(root + "\\"):
            return source[len(root) + 1:]
    path = urlsplit(source).path if "://" in source else source
    return basename(unquote(path))


def _stem_of(leaf: str) -> str:
    """The stem that the output's extension replaces: ``x.tar.jpg`` -> ``x.tar``."""
    stem = PurePosixPath(leaf).stem if "." in leaf.lstrip(".") else leaf
    return stem or leaf


def _key(text: str) -> int:
    # Names compared as case-insensitive file systems do (casefolded NFC); 8 bytes of a hash
    # a name: a (vanishingly rare) false match costs a needless suffix, never an overwrite.
    digest = hashlib.blake2b(text.casefold().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def plain_name(rel: str) -> str:
    """An item's output path without extension (``day1/IMG_0001``) before collisions;
    folders never end in an image extension (``a.png/`` -> ``a.png_/``),
    so a folder can never meet a file."""
    parts = relative_parts(rel)
    leaf = parts.pop() if parts else "image"
    folders = [safe_component(p) for p in parts[-MAX_FOLDERS:]]
    folders = [f + "_" if _IMAGE_SUFFIX.search(f) else f for f in folders]
    stem = safe_component(_stem_of(leaf))
    folder = "/".join(folders)
    return f"{folder}/{stem}" if folder else stem


class OutputNames:
    """The output names of one job's items, assigned in index order (a name depends only
    on the items before it, so a restart assigns the same ones). In memory: the names that
    needed a suffix, and, while items can still be added, 8-byte keys of the names taken
    (dropped once the list is complete and named)."""

    def __init__(self, relatives: Callable[[int, int], Iterable[str]]) -> None:
        self._relatives = relatives  # (start, stop) -> those items' relative source paths
        self._taken: set[int] | None = set()
        self._suffixed: dict[int, str] = {}
        self._assigned = 0
        self._lock = threading.Lock()

    def assign(self, count: int, *, complete: bool = False) -> None:
        """Name the items up to ``count`` (those known so far); ``complete``: no item will
        be added, so the keys of the names taken can go."""
        with self._lock:
            taken = self._taken
            if taken is None:
                return
            if self._assigned < count:
                for rel in self._relatives(self._assigned, count):
                    stem, n = plain_name(rel), 0
                    name = stem
                    while _key(name) in taken:
                        n += 1
                        name = f"{stem} ({n})"
                    taken.add(_key(name))
                    if n:
                        self._suffixed[self._assigned] = name
                    self._assigned += 1
            if complete:
                self._taken = None

    def name(self, index: int, fmt: str) -> str:
        """Item ``index``'s output name for format ``fmt`` (``assign`` named it already)."""
        if index >= self._assigned:
            raise IndexError(f"item {index} has no name assigned yet")
        stem = self._suffixed.get(index)
        if stem is None:
            stem = plain_name(next(iter(self._relatives(index, index + 1))))
        return f"{stem}.{OUTPUT_EXTENSIONS.get(fmt, fmt)}"


def zip_member(name: str, seen: set[str]) -> str:
    """``name`` as a ZIP member that extracts safely anywhere: a relative path of safe
    components (no ``..``, no absolute path, no drive letter), not equal (case-insensitively)
    to an earlier member's; ``seen`` collects the members so far."""
    parts = relative_parts(name)
    leaf = parts.pop() if parts else "image"
    folder = "/".join(safe_component(p) for p in parts)
    leaf = safe_component(leaf, MAX_STEM_BYTES + 20)
    stem, dot, ext = leaf.rpartition(".")
    if not dot:
        stem, ext = leaf, ""
    member, n = (f"{folder}/{leaf}" if folder else leaf), 0
    while member.casefold() in seen:
        n += 1
        leaf = f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})"
        member = f"{folder}/{leaf}" if folder else leaf
    seen.add(member.casefold())
    return member
