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
  same bytes: the 512 px JPEG in, and as many bytes back as ours answers (a 1024 px JPEG,
  5x the input; before 2026-12-05 the floor echoed the input) (target: <= 1.15).

    .venv/bin/python loadtests/serve_floor.py --config configs/local.yaml --repeats 5 \
        [--serve-env RAY_SERVE_ENABLE_HA_PROXY=1] [--steps [objects,batch,work]] --out docs/serve-floor.json

``--steps`` adds apps between the floor and ours (``STEPS``), so that a gap can be placed:
each is the floor plus one thing ours does. Besides the ratio of all processes' CPU, each row
has the ratio of the request path's own processes (``path_ms``), which Ray's periodic work
(the controller, the GCS) does not blur.

Not a test: run it alone on a quiet machine; it prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

FLOOR = "floor"
# Steps from the floor towards ours, each one thing of ours more (``--steps``):
# "objects": the ingress calls the model's ``enhance`` method with our argument types
# (bytes, ``EnhanceOptions``) and answers from our result type (``EnhancedImage``, its
# headers); "batch": that, plus the model's shape of work: a thread hop before and after,
# and ``@serve.batch`` (4 at most, 10 ms) between; "work": "objects" plus our image work
# (``plumbing_bench.image_work``: probe, decode, the null engine, encode) in one thread hop
# in the model, the least any Serve app doing that work spends, so that what doing image
# work in a replica costs on this machine (preemption, caches) is counted apart from ours.
STEPS = ("objects", "batch", "work")
OUT_BYTES = "x-floor-out-bytes"  # how many bytes the floor answers with (0: the body)


def deploy_floor(step: str = FLOOR, args: dict[str, Any] | None = None) -> None:
    """Serve's minimal ingress + model pair, as its docs write it (``step`` = "floor"), or
    one of ``STEPS``, at ``/<step>`` ("work" builds the engine from the app's ``args``).
    Zero CPUs each: they fit beside ours."""
    import asyncio

    from ray import cloudpickle, serve
    from starlette.requests import Request
    from starlette.responses import Response

    from serve_app.api.schemas import EnhancedImage
    from serve_app.options import EnhanceOptions

    zero = {"num_cpus": 0}
    cloudpickle.register_pickle_by_value(pb)  # the replicas cannot import loadtests/

    @serve.deployment(name="FloorModel", max_ongoing_requests=64, ray_actor_options=zero)
    class FloorModel:
        def __init__(self) -> None:
            self.answers: dict[int, bytes] = {}
            if step == "work":
                from serve_app.config import AppConfig
                from serve_app.engine import Engine

                config = AppConfig.model_validate(args)
                self.limits, self.engine = config.limits, Engine.from_config(config)

        def answer(self, data: bytes, out_bytes: int) -> bytes:
            if not out_bytes:
                return data
            # As many bytes back as ours answers (a 512 px x2 JPEG is 5x its input).
            if out_bytes not in self.answers:
                self.answers[out_bytes] = os.urandom(out_bytes)
            return self.answers[out_bytes]

        async def __call__(self, data: bytes, out_bytes: int = 0) -> bytes:
            return self.answer(data, out_bytes)

        async def enhance(self, data: bytes, options: EnhanceOptions,
                          out_bytes: int = 0) -> EnhancedImage:
            if step == "batch":
                data = await asyncio.to_thread(bytes, data)
                data = await self.batched(data)
                data = await asyncio.to_thread(bytes, data)
            if step == "work":
                data = await asyncio.to_thread(
                    pb.image_work, data, options.upscale, self.limits, self.engine)
            else:
                data = self.answer(data, out_bytes)
            return EnhancedImage(data=data, media_type="image/png", format="png", width=16,
                                 height=16, faces=0, face_boxes=(), synthetic=False,
                                 timings={"decode": 0.0, "engine": 0.0, "encode": 0.0})

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
        async def batched(self, items: list[bytes]) -> list[bytes]:
            return items

    @serve.deployment(name="FloorIngress", max_ongoing_requests=64, ray_actor_options=zero)
    class FloorIngress:
        def __init__(self, model: Any) -> None:
            self.model = model

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            out_bytes = int(request.headers.get(OUT_BYTES, "0"))
            if step == FLOOR:
                out = await self.model.remote(body, out_bytes)
                return Response(out, media_type=request.headers.get("content-type", "image/png"))
            upscale = int(request.query_params.get("upscale", "1"))
            opts = EnhanceOptions(upscale=upscale, face=False, bg_model="none")
            result = await self.model.enhance.remote(body, opts, out_bytes)
            return Response(result.data, media_type=result.media_type, headers=result.headers())

    serve.run(FloorIngress.bind(FloorModel.bind()), name=step, route_prefix=f"/{step}")


def set_affinity(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` (affinity is per thread; new threads inherit their creator's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # a thread that ended
            os.sched_setaffinity(int(tid), cores)


def pin_models(core: int) -> None:
    """Every model replica (ours with its codec workers, the floor's and the steps') on
    ``core`` alone, every other process of the tree on the other cores: the model replica
    has a core of its own, as on a GPU node (configs/gpu.yaml gives it cores per GPU), so its
    image work is not preempted by the proxy, the ingress and the client, which the
    in-process loop (run on that core too, see ``main``) is not either."""
    import psutil

    rest = set(range(os.cpu_count() or 1)) - {core}
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    models: set[int] = set()
    for p in procs:
        title = pb._title(p)
        if "Enhancer" in title or "FloorModel" in title:
            models |= {p.pid, *(c.pid for c in p.children(recursive=True))}
    for p in procs:
        set_affinity(p.pid, {core} if p.pid in models else rest)


def path_ms(window: dict[str, Any]) -> float:
    """CPU ms per request of the request's own processes (the client, the proxy, the two
    replicas, our codec workers), without Ray's periodic work (the controller, the GCS),
    which falls in one window or another at random."""
    return sum(v for k, v in window["cpu_ms_by_process"].items()
               if k in pb.REQUEST_PATH or k.startswith("ServeReplica:"))


def measure(url: str, case: pb.Case, concurrency: int, seconds: float, repeats: int,
            steps: tuple[str, ...] = ()) -> dict[str, Any]:
    """Alternating windows of ours, the floor and the ``steps``; medians and the spread of
    each one's ratio to the floor."""
    targets = {"ours": url, FLOOR: url + f"/{FLOOR}", **{s: url + f"/{s}" for s in steps}}
    warm = {name: asyncio.run(pb.http_window(target, case, concurrency, 2.0))
            for name, target in targets.items()}
    # The floor (and each step) moves the same bytes both ways: as many back as ours answers.
    size = {OUT_BYTES: str(round(warm["ours"]["out_bytes"] or 0))}
    idle = pb.idle_rates()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    # ABBA order: the controller's periodic work (seconds apart) would otherwise fall in the
    # same one of the alternating windows every time.
    for r in range(repeats):
        order = list(targets.items())
        for name, target in order if r % 2 == 0 else order[::-1]:
            runs[name].append(asyncio.run(pb.http_window(
                target, case, concurrency, seconds, idle, None if name == "ours" else size)))
    floor = runs[FLOOR]
    row: dict[str, Any] = {"floor_out_bytes": int(size[OUT_BYTES])}
    for name, windows in runs.items():
        mid = sorted(windows, key=lambda w: w["cpu_ms"])[len(windows) // 2]
        ratios = [w["cpu_ms"] / f["cpu_ms"] for w, f in zip(windows, floor, strict=True)]
        path_ratios = [path_ms(w) / path_ms(f) for w, f in zip(windows, floor, strict=True)]
        row[name] = {
            "rps": statistics.median(w["rps"] for w in windows),
            "cpu_ms": statistics.median(w["cpu_ms"] for w in windows),
            "path_cpu_ms": statistics.median(path_ms(w) for w in windows),
            "ratio_runs": [round(x, 3) for x in ratios],
            "ratio": statistics.median(ratios),
            "path_ratio_runs": [round(x, 3) for x in path_ratios],
            "path_ratio": statistics.median(path_ratios),
            "errors": sum(w["errors"] for w in windows),
            "cpu_ms_by_process": mid["cpu_ms_by_process"],
        }
    # The fields earlier reports had, for ours against the floor.
    ours = row["ours"]
    row.update({"ours_rps": ours["rps"], "ours_cpu_ms": ours["cpu_ms"],
                "floor_rps": row[FLOOR]["rps"], "floor_cpu_ms": row[FLOOR]["cpu_ms"],
                "ratio_runs": ours["ratio_runs"], "ratio": ours["ratio"],
                "errors": sum(r["errors"] for r in row.values() if isinstance(r, dict))})
    return row


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
    p.add_argument("--steps", nargs="?", const=",".join(STEPS), default="",
                   help=f"also these steps from the floor towards ours (all if none named): "
                   f"{', '.join(STEPS)}")
    p.add_argument("--pin-model", type=int, metavar="CORE",
                   help="model replicas on this core alone, the rest elsewhere; the "
                   "in-process loop then runs on it too (see pin_models)")
    p.add_argument("--out", type=Path)
    opts = p.parse_args(argv)
    steps = tuple(s for s in opts.steps.split(",") if s)
    if unknown := set(steps) - set(STEPS):
        p.error(f"unknown steps: {', '.join(sorted(unknown))}")

    for item in opts.serve_env:  # inherited by the raylet and every worker it starts
        key, _, value = item.partition("=")
        os.environ[key] = value
    base = Path(tempfile.mkdtemp(prefix="pe-floor-"))
    args = pb.app_args(opts.config, base)
    todo = pb.cases([c for c in opts.cases.split(",") if c])
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "config": str(opts.config),
        "serve_env": opts.serve_env, "concurrency": opts.concurrency, "seconds": opts.seconds,
        "repeats": opts.repeats, "pin_model": opts.pin_model, "load_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {},
    }
    ray_mod = None
    try:
        from serve_app.config import AppConfig
        from serve_app.engine.engine import Engine

        engine = Engine.from_config(AppConfig.model_validate(args))
        url, ray_mod = pb.start_server(args, base, opts.num_cpus)
        for step in (FLOOR, *steps):
            deploy_floor(step, args)
        if opts.pin_model is not None:
            pin_models(opts.pin_model)
        for case in todo:
            row = measure(url, case, opts.concurrency, opts.seconds, opts.repeats, steps)
            if case.upscale > 1 or case.name.startswith("512"):
                if opts.pin_model is not None:  # the image work alone on the model's core
                    set_affinity(os.getpid(), {opts.pin_model})
                runs = [pb.inproc(case, args, opts.threads, opts.seconds, engine)
                        for _ in range(opts.repeats)]
                if opts.pin_model is not None:
                    pin_models(opts.pin_model)
                row["inproc_cpu_ms"] = statistics.median(r["cpu_ms"] for r in runs)
                row["ours_overhead_cpu_ms"] = row["ours_cpu_ms"] - row["inproc_cpu_ms"]
                row["overhead_ratio"] = row["ours_overhead_cpu_ms"] / row["floor_cpu_ms"]
                if "work" in row:  # the same image work in Serve's least app, same windows
                    work = row["work"]
                    row["work_overhead_cpu_ms"] = work["cpu_ms"] - row["inproc_cpu_ms"]
                    row["work_overhead_ratio"] = row["work_overhead_cpu_ms"] / row["floor_cpu_ms"]
                    row["ours_over_work"] = row["ours_cpu_ms"] / work["cpu_ms"]
            report["cases"][case.name] = row
            print(f"{case.name}: ours {row['ours_rps']:.1f}/s {row['ours_cpu_ms']:.2f} cpu-ms, "
                  f"floor {row['floor_rps']:.1f}/s {row['floor_cpu_ms']:.2f} cpu-ms, "
                  f"ratio {row['ratio']:.2f} {row['ratio_runs']}"
                  + (f", overhead ratio {row['overhead_ratio']:.2f}" if "overhead_ratio" in row else "")
                  + (f", work's overhead ratio {row['work_overhead_ratio']:.2f}, ours / work "
                     f"{row['ours_over_work']:.2f}" if "ours_over_work" in row else ""),
                  flush=True)
            for name in ("ours", *steps):
                r = row[name]
                print(f"  {name}: path {r['path_cpu_ms']:.2f} cpu-ms, path ratio "
                      f"{r['path_ratio']:.2f} {r['path_ratio_runs']}, "
                      f"by process {r['cpu_ms_by_process']}", flush=True)
    finally:
        report["load_after"] = os.getloadavg()
        pb.stop_server(ray_mod, base)
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
