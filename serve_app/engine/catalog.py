"""The registry of added models: ``models.json`` beside their files, in a folder or a bucket.

Torch-free: the CLI writes it (``photoenhance models add``), every model replica reads it
(through fsspec, so ``s3://`` and ``gs://`` locations work like local folders), and the
ingress only sees what the replicas report. One record per model: what spandrel detected
(architecture, kind, scale, channels, tiling needs) and the SHA-256 sums of the added
file(s) and of the stored file, which a replica checks before it loads the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from serve_app.errors import InvalidOption, WeightsError
from serve_app.options import ADDED_NAME_PATTERN, BG_MODELS, FACE_MODELS, EnhanceOptions

LOGGER = logging.getLogger(__name__)

REGISTRY_FILE = "models.json"
FORMAT_VERSION = 1
RELOAD_S = 5.0  # a replica re-reads the registry (on a miss, or to list it) at most this often
RESERVED = frozenset((*FACE_MODELS, *BG_MODELS))


@dataclass(frozen=True)
class AddedModel:
    """One added model, as recorded in ``models.json``."""

    name: str
    kind: Literal["bg", "face"]  # served as bg_model (upscaler/restorer) or face_model
    arch: str  # spandrel's architecture id
    purpose: str  # spandrel's purpose: SR, Restoration or FaceSR
    scale: int
    in_channels: int
    out_channels: int
    tiling: Literal["supported", "discouraged", "internal"]
    size: dict[str, Any]  # spandrel's size requirements: minimum, multiple_of, square
    half: bool  # the architecture runs in fp16 (else fp32 on CUDA)
    params: int
    file: str  # stored file, relative to the registry
    sha256: str  # of the stored file; checked before every load
    source: dict[str, Any] = field(default_factory=dict)  # added files, their sums, format
    tags: list[str] = field(default_factory=list)
    added_at: str = ""

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows (no paths)."""
        out = asdict(self)
        out.pop("file")
        out["source"] = {k: v for k, v in self.source.items() if k != "files"}
        return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fs(location: str):
    import fsspec

    return fsspec.core.url_to_fs(location)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read(location: str) -> dict[str, AddedModel]:
    """The registry at ``location``; empty when it has none."""
    fs, root = _fs(location)
    path = _join(root, REGISTRY_FILE)
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as fh:
        raw = json.loads(fh.read())
    if raw.get("version") != FORMAT_VERSION:
        raise WeightsError(f"{REGISTRY_FILE}: unknown format version {raw.get('version')!r}")
    return {name: AddedModel(**rec) for name, rec in raw.get("models", {}).items()}


def read_file(location: str, model: AddedModel) -> bytes:
    """The stored weights of ``model``, checked against their recorded SHA-256."""
    fs, root = _fs(location)
    with fs.open(_join(root, model.file), "rb") as fh:
        data = fh.read()
    if sha256_bytes(data) != model.sha256:
        raise WeightsError(
            f"added model {model.name!r}: its file's SHA-256 differs from the registry's; "
            "add it again", model=model.name,
        )
    return data


@contextlib.contextmanager
def _updating(location: str) -> Iterator[tuple[Any, str]]:
    """Hold the registry for a read-modify-write: in a local folder an exclusive lock
    (``models.json.lock``), so two ``models add`` at once both land. Buckets have no locks:
    add models to a bucket from one place at a time (docs/MODELS.md)."""
    from filelock import FileLock
    from fsspec.implementations.local import LocalFileSystem

    fs, root = _fs(location)
    fs.makedirs(root, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        yield fs, root
        return
    with FileLock(_join(root, REGISTRY_FILE + ".lock")):
        yield fs, root


def write(location: str, model: AddedModel, data: bytes, *, replace: bool = False) -> None:
    """Store ``data`` as ``model.file`` and record ``model`` (file first, then the registry)."""
    check_name(model.name)
    with _updating(location) as (fs, root):
        models = read(location)
        if model.name in models and not replace:
            raise FileExistsError(f"a model named {model.name!r} is already added (use --replace)")
        models[model.name] = model
        _put(fs, _join(root, model.file), data)
        _put(fs, _join(root, REGISTRY_FILE), _dump(models))


def _dump(models: dict[str, AddedModel]) -> bytes:
    return json.dumps(
        {"version": FORMAT_VERSION, "models": {n: asdict(m) for n, m in sorted(models.items())}},
        indent=2,
    ).encode()


def remove(location: str, name: str) -> None:
    """Drop ``name`` from the registry, then delete its file."""
    with _updating(location) as (fs, root):
        models = read(location)
        model = models.pop(name)  # KeyError: not added
        _put(fs, _join(root, REGISTRY_FILE), _dump(models))
        fs.rm(_join(root, model.file))


def _put(fs: Any, path: str, data: bytes) -> None:
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        # Local: write a temp file and rename, so a replica never reads half a file.
        folder = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(prefix=".added.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with fs.open(path, "wb") as fh:  # object stores replace whole objects
        fh.write(data)


def check_name(name: str) -> None:
    import re

    if not re.fullmatch(ADDED_NAME_PATTERN, name):
        raise ValueError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, "
            "starting with a letter or digit)"
        )
    if name in RESERVED:
        raise ValueError(f"model name {name!r} is a built-in name; choose another")


class Catalog:
    """A replica's view of the registry: read at start, re-read on a miss (rate-limited)."""

    def __init__(self, location: str | None) -> None:
        self.location = location  # None: no added models (an engine built without a config)
        self._models: dict[str, AddedModel] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        if self.location is None:
            return
        with self._lock:
            try:
                self._models = read(self.location)
            except FileNotFoundError:
                self._models = {}
            except Exception as exc:  # an unreadable registry must not stop built-in models
                LOGGER.error("added-model registry at %s unreadable: %s", self.location, exc)
            self._read_at = time.monotonic()

    def _stale(self) -> bool:
        return self.location is not None and time.monotonic() - self._read_at > RELOAD_S

    def get(self, name: str) -> AddedModel | None:
        model = self._models.get(name)
        if model is None and self._stale():
            self.refresh()  # added after this replica started
            model = self._models.get(name)
        return model

    def listing(self) -> list[dict[str, Any]]:
        if self._stale():
            self.refresh()
        return [m.public() for _, m in sorted(self._models.items())]

    def check(self, opt: EnhanceOptions) -> None:
        """Refuse (422) options naming an unknown added model or one of the wrong kind."""
        check_options(opt, lambda name: (m.kind if (m := self.get(name)) else None))


def added_fields(opt: EnhanceOptions) -> list[tuple[str, str, str]]:
    """(option, name, kind) of each added model ``opt`` would run: names not built in."""
    out = []
    if opt.face and opt.face_model not in FACE_MODELS:
        out.append(("face_model", opt.face_model, "face"))
    bg = opt.resolved_bg_model()
    if bg not in BG_MODELS and not (opt.face and opt.aligned):
        out.append(("bg_model", bg, "bg"))
    return out


def check_options(opt: EnhanceOptions, kind_of: Callable[[str], str | None]) -> None:
    """Refuse (422) options naming a model ``kind_of`` does not know (None) or one of the
    wrong kind; ``kind_of`` says an added model's kind (``face`` or ``bg``)."""
    for field_name, name, kind in added_fields(opt):
        found = kind_of(name)
        if found is None:
            raise InvalidOption(
                f"{field_name}: no model named {name!r} (see GET /v1/models)",
                field=field_name, code="unknown_model",
            )
        if found != kind:
            other = "face_model" if found == "face" else "bg_model"
            raise InvalidOption(
                f"{field_name}: {name!r} is a {_KIND_WORDS[found]}; use it as {other}",
                field=field_name, code="wrong_model_kind",
            )


_KIND_WORDS = {"bg": "whole-image model (upscaler or restorer)", "face": "face restorer"}
