"""Per network on the CPU: forwards one at a time with torch's threads, against the same
forwards side by side in the engine's ``Lanes`` (one torch thread each), contiguous and
channels-last. What ``engine.cpu_lanes`` and the CPU's channels-last layout rest on
(docs/BENCHMARKS.md, "Forwards side by side: lanes").

    .venv/bin/python loadtests/lanes_bench.py --weights-dir /tmp/eng/wd --items 8 --repeats 3

Not a test: run it alone on a quiet machine; it prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

# name, input side: the crops are 512 px; the upsampler's tiles as a 512 px photo at x2 has.
NETWORKS = (("GFPGANv1.4", 512), ("parsing_parsenet", 512), ("RealESRGAN_x2plus", 256))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _window(run: Any, items: int) -> tuple[float, float]:
    """(items per second, CPU ms per item) of ``run()`` doing ``items`` forwards."""
    t, c = time.perf_counter(), _cpu()
    run()
    t, c = time.perf_counter() - t, _cpu() - c
    return items / t, 1000 * c / items


def measure(net: torch.nn.Module, side: int, lanes: Any, items: int, repeats: int,
            face: bool) -> dict[str, Any]:
    x = torch.rand(1, 3, side, side)

    def forward(_: object = None, layout: torch.memory_format = torch.contiguous_format) -> None:
        with torch.inference_mode():
            y = x.contiguous(memory_format=layout)
            net(y * 2 - 1, return_rgb=False) if face else net(y)

    modes = {
        "one_at_a_time": lambda: [forward() for _ in range(items)],
        "lanes": lambda: lanes.map(forward, range(items)),
    }
    if not face:  # GFPGAN .view()s its features: never channels-last
        modes["lanes_channels_last"] = lambda: lanes.map(
            lambda _: forward(layout=torch.channels_last), range(items))
    out: dict[str, Any] = {}
    for name, run in modes.items():
        layout = torch.channels_last if name.endswith("channels_last") else torch.contiguous_format
        net.to(memory_format=layout)
        run()  # warm: oneDNN builds its kernels per shape and layout
        rows = [_window(run, items) for _ in range(repeats)]
        out[name] = {"items_per_s": statistics.median(r[0] for r in rows),
                     "cpu_ms_per_item": statistics.median(r[1] for r in rows),
                     "runs": [[round(a, 2), round(b, 1)] for a, b in rows]}
        net.to(memory_format=torch.contiguous_format)
    return out


def main(argv: list[str] | None = None) -> int:
    from serve_app.config import AppConfig
    from serve_app.engine import Engine
    from serve_app.engine.chunks import Lanes
    from serve_app.engine.synthetic import synth

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=Path("/tmp/eng/wd"))
    p.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    opts = p.parse_args(argv)

    folder = opts.weights_dir / opts.profile
    if not (folder / "GFPGANv1.4.pth").exists():
        synth(folder, opts.profile)
    engine = Engine.from_config(AppConfig.model_validate({
        "weights": {"dir": str(folder)},
        "engine": {"device": "cpu", "cpu_lanes": 1, "channels_last": False, "warmup": False},
    }))
    lanes = Lanes(torch.get_num_threads())
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "lanes": lanes.n, "profile": opts.profile,
        "items": opts.items, "repeats": opts.repeats, "load_before": os.getloadavg(),
        "networks": {},
    }
    for name, side in NETWORKS:
        row = measure(engine.net(name), side, lanes, opts.items, opts.repeats, name.startswith("GFPGAN"))
        report["networks"][name] = row
        print(name, ", ".join(f"{m}: {r['items_per_s']:.1f}/s {r['cpu_ms_per_item']:.0f} ms"
                              for m, r in row.items()), flush=True)
    report["load_after"] = os.getloadavg()
    lanes.close()
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
