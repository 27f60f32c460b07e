"""`photoenhance models add` from several processes at once: every model lands in
``models.json`` (a read-modify-write under the registry's lock), none is lost."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from serve_app.engine import catalog

PROCESSES, EACH = 4, 12


def _record(name: str) -> catalog.AddedModel:
    return catalog.AddedModel(
        name=name, kind="bg", arch="ESRGAN", purpose="SR", scale=2, in_channels=3,
        out_channels=3, tiling="supported", size={}, half=True, params=1,
        file=f"{name}.safetensors", sha256=catalog.sha256_bytes(name.encode()),
    )


def _add_many(location: str, worker: int) -> None:
    for i in range(EACH):
        name = f"m{worker}-{i}"
        catalog.write(location, _record(name), name.encode())


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    location = str(tmp_path / "weights")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(location, w)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    models = catalog.read(location)
    want = {f"m{w}-{i}" for w in range(PROCESSES) for i in range(EACH)}
    assert set(models) == want
    for name in list(want)[:5]:
        assert catalog.read_file(location, models[name]) == name.encode()
    # Removing under the same lock: the others stay.
    catalog.remove(location, "m0-0")
    assert set(catalog.read(location)) == want - {"m0-0"}
    assert not (tmp_path / "weights" / "m0-0.safetensors").exists()
