"""Plumbing benchmark: the HTTP path with a null engine against an in-process loop.

The null engine is ``face=false&bg_model=none``: no network runs, the engine only resizes
(Lanczos) when ``upscale`` > 1. So the HTTP path does what the in-process loop does (probe,
decode, resize, encode) plus everything the serving layer adds: proxy, ingress, handle calls,
``serve.batch``, serialisation. Both run on this machine with the same number of threads.

    .venv/bin/python loadtests/plumbing_bench.py --config configs/local.yaml \
        --cases 512-jpeg-x2,512-png-x2,12mp-jpeg-x1,12mp-png-x1,512-jpeg-x1 \
        --repeats 3 --out docs/plumbing-bench.json

``--mode http`` starts its own one-machine Ray (its own temp dir, ``address="local"``), deploys
the config's application on a free port, and drives it with an aiohttp client (``--concurrency``
connections, keep-alive, raw bodies); ``--mode inproc`` runs ``--threads`` threads each doing
``codec.probe``, ``codec.decode``, ``Engine.enhance_batch`` and ``codec.encode``; ``--mode both``
(default) runs both. ``--url`` drives a server that is already running instead.
Each figure is the median of ``--repeats`` windows of ``--seconds`` (12 MP: ``--seconds-large``).

Two cases measure the serving path's own floor: ``16-png-x1`` (a 16 px image: two Serve hops
with almost no image work) and ``healthz`` (``GET /healthz``: the proxy and the ingress only,
HTTP path only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = ROOT.parent / "shared" / "data" / "images"
# --code DIR: benchmark another checkout (e.g. "before": `git archive <commit> | tar -x -C DIR`).
if "--code" in sys.argv:
    ROOT = Path(sys.argv[sys.argv.index("--code") + 1]).resolve()
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    upscale: int
    fmt: str

    @property
    def large(self) -> bool:
        return len(self.data) > 2_000_000 or self.name.startswith("12mp")


def make_inputs() -> dict[str, bytes]:
    """512 px and 12 MP JPEG (quality 90) and PNG, from the shared photos (12 MP: upscaled
    with a little noise, so that it compresses like a camera photo)."""
    import cv2

    small = cv2.imread(str(SHARED_IMAGES / "Adele_crop.png"), cv2.IMREAD_COLOR)
    big = cv2.imread(str(SHARED_IMAGES / "10045.png"), cv2.IMREAD_COLOR)
    big = cv2.resize(big, (4000, 3000), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(0)
    big = np.clip(big.astype(np.int16) + rng.normal(0, 2.0, big.shape).astype(np.int16), 0, 255)
    big = big.astype(np.uint8)
    out = {}
    # 16 px: almost no image work, so its cost is the serving path's own floor.
    for label, img in (("16", small[:16, :16]), ("512", small), ("12mp", big)):
        out[f"{label}-jpeg"] = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        out[f"{label}-png"] = cv2.imencode(".png", img)[1].tobytes()
    return out


# A pseudo-case: GET /healthz, the proxy and the ingress with no model call (one Serve hop).
HEALTHZ = "healthz"


def cases(names: list[str]) -> list[Case]:
    inputs = make_inputs()
    out = []
    for name in names:
        if name == HEALTHZ:
            out.append(Case(name, b"", 1, "none"))
            continue
        size, fmt, scale = name.split("-")
        out.append(Case(name, inputs[f"{size}-{fmt}"], int(scale.removeprefix("x")), fmt))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_args(config: Path, base: Path) -> dict[str, Any]:
    raw = yaml.safe_load(config.read_text())
    args = dict(raw["applications"][0]["args"])
    args["weights"] = {**args.get("weights", {}), "dir": str(base / "weights"),
                       "source": "synthetic", "profile": "tiny"}
    args["jobs"] = {**args.get("jobs", {}), "data_dir": str(base / "data")}
    return args


# ------------------------------------------------------------------ in-process loop


def image_work(data: bytes, upscale: int, limits: Any, engine: Any) -> bytes:
    """One image's work as the model replica does it, null engine: probe, decode, the
    engine (upscale only), encode. The in-process loop runs it; so does serve_floor's "work"
    step, inside a minimal Serve app."""
    from serve_app import codec
    from serve_app.options import EnhanceOptions

    opt = EnhanceOptions(upscale=upscale, face=False, bg_model="none")
    info = codec.probe(data, limits, upscale)
    decoded = codec.decode(data, info)
    [res] = engine.enhance_batch([decoded.image], [opt])
    fmt = codec.output_format(None, decoded.format, res.image)
    return codec.encode(res.image, fmt, opt.quality)


def inproc(case: Case, args: dict[str, Any], threads: int, seconds: float, engine: Any) -> dict[str, float]:
    from serve_app.config import AppConfig

    limits = AppConfig.model_validate(args).limits
    done = [0] * threads
    stop = time.perf_counter() + seconds
    start_at = time.perf_counter()

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            image_work(case.data, case.upscale, limits, engine)
            done[i] += 1

    cpu0 = time.process_time()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    n = max(sum(done), 1)
    return {"rps": sum(done) / (time.perf_counter() - start_at),
            "cpu_ms": 1000 * (time.process_time() - cpu0) / n}


# ------------------------------------------------------------------ HTTP path


def tree_cpu() -> dict[str, float]:
    """CPU seconds of this process (the client) and of all its descendants (the local Ray it
    started: GCS, raylet, proxy, controller, replicas), by process title, so the HTTP path's
    CPU per request can be compared with the in-process loop's on a machine that others load
    too, and split by where it goes."""
    import psutil

    out: dict[str, float] = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            title = "client" if proc.pid == me.pid else _title(proc)
            out[title] = out.get(title, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def _title(proc: Any) -> str:
    cmd = proc.cmdline()
    head = (cmd[0] if cmd else proc.name()).split()[0] if (cmd or proc.name()) else "?"
    if head.startswith("ray::"):
        return head.removeprefix("ray::").removeprefix("ServeReplica:photoenhance:")
    return Path(head).name


# "python": the model replica's codec worker processes (and, idle-subtracted, Ray's log monitor)
REQUEST_PATH = ("client", "ProxyActor", "Ingress", "Enhancer", "python")


def idle_rates(seconds: float = 5.0) -> dict[str, float]:
    """CPU seconds per second of each process with no requests (metrics pushes, health
    checks, the controller's loop): subtracted from the windows, which then count the
    requests' own CPU."""
    before = tree_cpu()
    time.sleep(seconds)
    after = tree_cpu()
    return {k: max(v - before.get(k, 0.0), 0.0) / seconds for k, v in after.items()}


async def http_window(
    url: str, case: Case, concurrency: int, seconds: float, idle: dict[str, float] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    import aiohttp

    query = f"upscale={case.upscale}&face=false&bg_model=none"
    headers = {"Content-Type": f"image/{case.fmt}", **(extra_headers or {})}
    done = errors = 0
    out_bytes = 0
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stop = time.perf_counter() + seconds
        start_at = time.perf_counter()
        cpu0 = tree_cpu()

        async def worker() -> None:
            nonlocal done, errors, out_bytes
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                if case.name == HEALTHZ:
                    request = session.get(f"{url}/healthz")
                else:
                    request = session.post(f"{url}/v1/enhance?{query}", data=case.data,
                                           headers=headers)
                async with request as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        done += 1
                        out_bytes += len(body)
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1
                        if errors <= 3:
                            print(f"  {resp.status}: {body[:200]!r}", file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start_at
        cpu1 = tree_cpu()
        idle = idle or {}
        by_process = {k: max(v - cpu0.get(k, 0.0) - idle.get(k, 0.0) * elapsed, 0.0)
                      for k, v in cpu1.items()}
        cpu = sum(by_process.values())
        path_cpu = sum(v for k, v in by_process.items() if k in REQUEST_PATH)
    latencies.sort()
    return {
        "rps": done / elapsed,
        "cpu_ms": 1000 * cpu / max(done, 1),
        "path_cpu_ms": 1000 * path_cpu / max(done, 1),
        "cpu_ms_by_process": {k: round(1000 * v / max(done, 1), 2) for k, v in
                              sorted(by_process.items(), key=lambda kv: -kv[1]) if v > 0},
        "done": done,
        "errors": errors,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "out_bytes": out_bytes / done if done else None,
    }


def start_server(args: dict[str, Any], base: Path, num_cpus: int) -> tuple[str, Any]:
    import ray
    from ray import serve

    from serve_app.client import wait_ready
    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    port = free_port()
    # On a loaded machine the dashboard agent can miss the raylet's start-up deadline.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    for attempt in range(6):  # a loaded machine can miss Ray's start-up deadlines
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     _temp_dir=str(base / f"ray{attempt}"), log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
            break
        except Exception as exc:  # noqa: BLE001
            print(f"ray start failed ({exc}); retrying", file=sys.stderr)
            ray.shutdown()
    else:
        raise RuntimeError("Ray did not start")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 180)
    return url, ray


def stop_server(ray_mod: Any, base: Path) -> None:
    """End what ``start_server`` started (if it did) and remove the run's folder."""
    if ray_mod is not None:
        from ray import serve

        serve.shutdown()
        ray_mod.shutdown()
    shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    p.add_argument("--cases", default="512-jpeg-x2,512-png-x2,12mp-jpeg-x1,12mp-png-x1,512-jpeg-x1")
    p.add_argument("--mode", choices=["http", "inproc", "both"], default="both")
    p.add_argument("--url", help="drive this running server instead of starting one")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seconds-large", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=4, help="Ray's logical CPUs")
    p.add_argument("--label", default="")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose serve_app runs")
    p.add_argument("--concurrency-large", type=int, default=4)
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the local Ray (its proxy and replicas), e.g. "
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED=1; repeatable")
    p.add_argument("--out", type=Path)
    opts = p.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="pe-plumb-"))
    args = app_args(opts.config, base)
    for item in opts.serve_env:  # inherited by the raylet and every worker it starts
        key, _, value = item.partition("=")
        os.environ[key] = value
    todo = cases([c for c in opts.cases.split(",") if c])
    report: dict[str, Any] = {
        "label": opts.label, "config": str(opts.config), "machine": platform.machine(),
        "cpus": os.cpu_count(), "concurrency": opts.concurrency, "threads": opts.threads,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {},
        "serve_env": opts.serve_env,
    }
    ray_mod = None
    try:
        if opts.mode in ("inproc", "both"):
            from serve_app.config import AppConfig
            from serve_app.engine.engine import Engine

            engine = Engine.from_config(AppConfig.model_validate(args))
            for case in todo:
                if case.name == HEALTHZ:
                    continue
                secs = opts.seconds_large if case.large else opts.seconds
                inproc(case, args, opts.threads, min(2.0, secs), engine)  # warm-up
                runs = [inproc(case, args, opts.threads, secs, engine) for _ in range(opts.repeats)]
                row = report["cases"].setdefault(case.name, {"in_bytes": len(case.data)})
                row["inproc_runs"] = [r["rps"] for r in runs]
                row["inproc"] = statistics.median(row["inproc_runs"])
                row["inproc_cpu_ms"] = statistics.median(r["cpu_ms"] for r in runs)
                print(f"inproc {case.name}: {row['inproc']:.1f}/s {row['inproc_cpu_ms']:.1f} cpu-ms"
                      f"  {row['inproc_runs']}", flush=True)
        if opts.mode in ("http", "both"):
            url = opts.url
            if url is None:
                url, ray_mod = start_server(args, base, opts.num_cpus)
            for case in todo:
                secs = opts.seconds_large if case.large else opts.seconds
                conc = opts.concurrency_large if case.large else opts.concurrency
                asyncio.run(http_window(url, case, conc, min(3.0, secs)))  # warm-up
                idle = idle_rates()
                runs = [asyncio.run(http_window(url, case, conc, secs, idle)) for _ in range(opts.repeats)]
                row = report["cases"].setdefault(case.name, {"in_bytes": len(case.data)})
                row["http_runs"] = [r["rps"] for r in runs]
                row["http"] = statistics.median(row["http_runs"])
                row["http_p50_ms"] = statistics.median(r["p50_ms"] or 0 for r in runs)
                row["http_cpu_ms"] = statistics.median(r["cpu_ms"] for r in runs)
                row["http_path_cpu_ms"] = statistics.median(r["path_cpu_ms"] for r in runs)
                row["http_cpu_ms_by_process"] = runs[len(runs) // 2]["cpu_ms_by_process"]
                row["out_bytes"] = runs[-1]["out_bytes"]
                row["errors"] = sum(r["errors"] for r in runs)
                if "inproc" in row:
                    row["ratio"] = row["http"] / row["inproc"]
                    row["cpu_ratio"] = row["inproc_cpu_ms"] / row["http_path_cpu_ms"]
                print(f"http {case.name}: {row['http']:.1f}/s {row['http_cpu_ms']:.1f} cpu-ms "
                      f"(request path {row['http_path_cpu_ms']:.1f}) "
                      f"{row['http_runs']} p50 {row['http_p50_ms']:.0f} ms ratio "
                      f"{row.get('ratio', 0):.2f} cpu ratio {row.get('cpu_ratio', 0):.2f}\n"
                      f"  cpu-ms by process: {row['http_cpu_ms_by_process']}", flush=True)
    finally:
        report["load_after"] = os.getloadavg()
        stop_server(ray_mod, base)
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["cases"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
