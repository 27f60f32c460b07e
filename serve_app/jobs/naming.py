"""Names that are safe to put on disk: job ids, spooled upload names, output names.

Whatever a client calls a file (``../../x.png``, ``C:\\evil``, ``.bashrc``, a name with
control characters), the name that reaches storage is a single path component made of
ordinary characters, prefixed with the item's index so that names never collide.
"""

from __future__ import annotations

import re
import secrets
import time
import unicodedata
from pathlib import PurePosixPath

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_JOB_ID = re.compile(r"^j[0-9]{14}[0-9a-f]{8}$")
MAX_STEM = 80
OUTPUT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


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


def output_name(index: int, source_name: str, fmt: str) -> str:
    """The output's name inside the job's output folder, e.g. ``000007_portrait.png``."""
    return f"{index:06d}_{safe_stem(source_name)}.{OUTPUT_EXTENSIONS.get(fmt, fmt)}"
