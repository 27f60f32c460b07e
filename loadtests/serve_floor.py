"""Our serving path against Ray Serve's own floor, side by side in one Ray.

The floor is the smallest two-deployment Serve application that moves the same bytes the
same way: an ingress that reads the body and awaits a model deployment's handle, and a model
that hands the bytes back. Both it (at ``/floor``) and ours (the config's application at
``/``, null engine: ``face=false&bg_model=none``) run in the same local Ray, behind the same
proxy, driven by the same client (``plumbing_bench.http_window``: keep-alive connections, CPU
of every process of the tree summed per request, idle CPU subtracted), in alternating windows,
so both see the same machine. The report is the ratio of CPU per request, ours / floor.

- ``16-png-x1``: both move 16 px of PNG; the ratio is our serving overhead against Serve's
  (issue 18's target: <= 1.15).
- ``512-jpeg-x2``: ours also decodes, resizes and encodes; its serving overhead is ours minus
  the same image work in process (``plumbing_bench.inproc``), against the floor moving the
  512 px bytes (target: <= 1.15).

    .venv/bin/python loadtests/serve_floor.py --config configs/local.yaml --repeats 5 \
        [--serve-env RAY_SERVE_ENABLE_HA_PROXY=1] --out docs/serve-floor.json

Not a test: run it alone on a quiet machine; it prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plumbing_bench as pb  # noqa: E402

FLOOR_APP, FLOOR_PREFIX = "floor", "/floor"


def deploy_floor() -> None:
    """Serve's minimal ingress + model pair, as its docs write it."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(max_ongoing_requests=64)
    class FloorModel:
        async def __call__(self, data: bytes) -> bytes:
            return data

    @serve.deployment(max_ongoing_requests=64)
    class FloorIngress:
        def __init__(self, model: Any) -> None:
            self.model = model

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            out = await self.model.remote(body)
            return Response(out, media_type=request.headers.get("content-type", "image/png"))

    serve.run(FloorIngress.bind(FloorModel.bind()), name=FLOOR_APP, route_prefix=FLOOR_PREFIX)


def measure(url: str, case: pb.Case, concurrency: int, seconds: float, repeats: int) -> dict[str, Any]:
    """Alternating windows of ours and the floor; medians and the spread of the ratio."""
    floor_url = url + FLOOR_PREFIX
    for target in (url, floor_url):  # warm both
        asyncio.run(pb.http_window(target, case, concurrency, 2.0))
    idle = pb.idle_rates()
    ours, floor = [], []
    # ABBA order: the controller's periodic work (seconds apart) would otherwise fall in the
    # same one of two alternating windows every time.
    for r in range(repeats):
        pair = [(url, ours), (floor_url, floor)]
        for target, runs in pair if r % 2 == 0 else pair[::-1]:
            runs.append(asyncio.run(pb.http_window(target, case, concurrency, seconds, idle)))
    ratios = [o["cpu_ms"] / f["cpu_ms"] for o, f in zip(ours, floor, strict=True)]
    return {
        "ours_rps": statistics.median(r["rps"] for r in ours),
        "ours_cpu_ms": statistics.median(r["cpu_ms"] for r in ours),
        "floor_rps": statistics.median(r["rps"] for r in floor),
        "floor_cpu_ms": statistics.median(r["cpu_ms"] for r in floor),
        "ratio_runs": [round(r, 3) for r in ratios],
        "ratio": statistics.median(ratios),
        "errors": sum(r["errors"] for r in ours + floor),
        "ours_cpu_ms_by_process": ours[len(ours) // 2]["cpu_ms_by_process"],
        "floor_cpu_ms_by_process": floor[len(floor) // 2]["cpu_ms_by_process"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=pb.ROOT / "configs" / "local.yaml")
    p.add_argument("--cases", default="16-png-x1,512-jpeg-x2")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="threads of the in-process loop")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path)
    opts = p.parse_args(argv)

    for item in opts.serve_env:  # inherited by the raylet and every worker it starts
        key, _, value = item.partition("=")
        os.environ[key] = value
    base = Path(tempfile.mkdtemp(prefix="pe-floor-"))
    args = pb.app_args(opts.config, base)
    todo = pb.cases([c for c in opts.cases.split(",") if c])
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "config": str(opts.config),
        "serve_env": opts.serve_env, "concurrency": opts.concurrency, "seconds": opts.seconds,
        "repeats": opts.repeats, "load_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {},
    }
    ray_mod = None
    try:
        from serve_app.config import AppConfig
        from serve_app.engine.engine import Engine

        engine = Engine.from_config(AppConfig.model_validate(args))
        url, ray_mod = pb.start_server(args, base, opts.num_cpus)
        deploy_floor()
        for case in todo:
            row = measure(url, case, opts.concurrency, opts.seconds, opts.repeats)
            if case.upscale > 1 or case.name.startswith("512"):
                runs = [pb.inproc(case, args, opts.threads, opts.seconds, engine)
                        for _ in range(opts.repeats)]
                row["inproc_cpu_ms"] = statistics.median(r["cpu_ms"] for r in runs)
                row["ours_overhead_cpu_ms"] = row["ours_cpu_ms"] - row["inproc_cpu_ms"]
                row["overhead_ratio"] = row["ours_overhead_cpu_ms"] / row["floor_cpu_ms"]
            report["cases"][case.name] = row
            print(f"{case.name}: ours {row['ours_rps']:.1f}/s {row['ours_cpu_ms']:.2f} cpu-ms, "
                  f"floor {row['floor_rps']:.1f}/s {row['floor_cpu_ms']:.2f} cpu-ms, "
                  f"ratio {row['ratio']:.2f} {row['ratio_runs']}"
                  + (f", overhead ratio {row['overhead_ratio']:.2f}" if "overhead_ratio" in row else ""),
                  flush=True)
    finally:
        report["load_after"] = os.getloadavg()
        pb.stop_server(ray_mod, base)
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
