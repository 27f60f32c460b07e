"""Saved presets written by several real processes at once (as ingress replicas on one node
do): the file lock keeps every update, and readers never see half a file."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

WRITERS, EACH = 4, 15


def _writer(path: str, who: int, start: mp.Event) -> None:
    from serve_app.presets import PresetStore

    store = PresetStore(Path(path))
    start.wait(60)
    for i in range(EACH):
        store.put(f"w{who}-{i}", {"upscale": 2, "weight": round(0.05 * (i % 20), 2)})
        # Read back through a fresh store: a half-written file would fail to parse.
        assert f"w{who}-{i}" in PresetStore(Path(path)).custom()


def test_concurrent_writers_in_separate_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "presets.json"
    ctx = mp.get_context("spawn")  # fresh interpreters: no lock state shared through fork
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(path), w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    data = json.loads(path.read_text())
    assert set(data) == {f"w{w}-{i}" for w in range(WRITERS) for i in range(EACH)}
    assert data["w3-7"] == {"upscale": 2, "weight": 0.35}
    assert not list(tmp_path.glob(".presets.*.tmp"))
