"""Where a model replica's CPU goes, by shared library, against the same image work in process.

``serve_floor.py`` found the 512 px x2 path's serving overhead above its target, with the
model replica the largest share. This samples the running replicas (``perf record``, the
replica processes only) under the same load as ``serve_floor`` (``plumbing_bench.http_window``,
null engine), then the in-process loop (``plumbing_bench.inproc``) in a child process, and
reports per request the CPU ms that fell in each library (OpenCV, libjpeg, the kernel, the
Python interpreter, libc, Ray's ``_raylet.so``). A library's ms = its share of the process's
samples x the process's CPU per request; the difference between the two columns is what
running inside a Serve replica adds to the same work. The same load, in a window of its own,
also goes to serve_floor's "work" step (Serve's least app doing the same image work in one
thread hop), whose model replica is sampled too: ours minus it is what our own serving
code costs beyond Serve's.

    .venv/bin/python loadtests/replica_profile.py --case 512-jpeg-x2 --repeats 3 \
        --out docs/replica-profile.json

Needs ``perf`` (linux-perf) with permission to sample other processes. Not a test: run it
alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plumbing_bench as pb  # noqa: E402

PROCESSES = ("Enhancer", "Ingress")
# serve_floor's "work" step: Serve's least app doing the same image work in one thread hop.
WORK_PROCESSES = {"ServeReplica:work:FloorModel": "work model",
                  "ServeReplica:work:FloorIngress": "work ingress"}
# perf's dso names, shortened to what they are.
LIBRARIES = {"cv2": "opencv", "libjpeg": "libjpeg (Pillow)", "kernel": "kernel",
             "libpython": "python", "libc.so": "libc", "_raylet": "ray (_raylet.so)",
             "torch": "torch", "_imaging": "Pillow"}


def dso_shares(data: Path) -> dict[str, float]:
    """Fraction of the samples in ``data`` per library (``LIBRARIES``; the rest as "other")."""
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio",
         "-g", "none"], capture_output=True, text=True, check=True).stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)", line)
        if not m:
            continue
        name = next((v for k, v in LIBRARIES.items() if k in m.group(2)), "other")
        out[name] = out.get(name, 0.0) + float(m.group(1)) / 100
    return out


def record(pid: int, seconds: float, data: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["perf", "record", "-F", "999", "-e", "cpu-clock", "-g", "-o", str(data), "-p", str(pid),
         "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def served(args: dict[str, Any], base: Path, case: pb.Case, seconds: float,
           concurrency: int, work: Path) -> dict[str, Any]:
    import psutil
    from serve_floor import deploy_floor

    url, ray_mod = pb.start_server(args, base, 4)
    out: dict[str, Any] = {}
    try:
        deploy_floor("work", args)
        titles = {pb._title(p): p.pid for p in psutil.Process().children(recursive=True)}
        for target, names in ((url, {n: n for n in PROCESSES}), (url + "/work", WORK_PROCESSES)):
            asyncio.run(pb.http_window(target, case, concurrency, 3.0))  # warm
            pids = {label: titles[title] for title, label in names.items()}
            with ThreadPoolExecutor(1) as pool:
                loading = pool.submit(asyncio.run, pb.http_window(
                    target, case, concurrency, seconds + 4, pb.idle_rates()))
                time.sleep(2)  # sample the middle of the window, not its ramp
                for p in [record(pid, seconds, work / f"{label}.data")
                          for label, pid in pids.items()]:
                    p.wait()
                window = loading.result()
            out["rps" if target == url else "work_rps"] = window["rps"]
            for title, label in names.items():
                cpu_ms = window["cpu_ms_by_process"].get(title, 0.0)  # none above idle
                shares = dso_shares(work / f"{label}.data")
                out[label] = {"cpu_ms": cpu_ms, "ms_by_library": {
                    k: round(v * cpu_ms, 2) for k, v in shares.items()}}
    finally:
        pb.stop_server(ray_mod, base)
    return out


def in_process(config: Path, case_name: str, seconds: float, threads: int,
               work: Path) -> dict[str, Any]:
    """The in-process loop in a child (so that perf samples it alone), as serve_floor runs it."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", "--config", str(config), "--case", case_name,
         "--seconds", str(seconds + 4), "--threads", str(threads)],
        stdout=subprocess.PIPE, text=True, cwd=pb.ROOT,
        env={**os.environ, "PYTHONPATH": str(pb.ROOT)})
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("READY"):
            break
    time.sleep(2)
    record(child.pid, seconds, work / "inproc.data").wait()
    result = json.loads(child.stdout.readline())
    child.wait()
    shares = dso_shares(work / "inproc.data")
    return {"rps": result["rps"], "cpu_ms": result["cpu_ms"],
            "ms_by_library": {k: round(v * result["cpu_ms"], 2) for k, v in shares.items()}}


def child_loop(config: Path, case_name: str, seconds: float, threads: int) -> None:
    """``--child``: warm up, say READY, run the loop for ``seconds``, print its figures."""
    from serve_app.config import AppConfig
    from serve_app.engine.engine import Engine

    with tempfile.TemporaryDirectory(prefix="pe-profile-child-") as base:
        args = pb.app_args(config, Path(base))
        [case] = pb.cases([case_name])
        engine = Engine.from_config(AppConfig.model_validate(args))
        pb.inproc(case, args, threads, 3.0, engine)
        print("READY", flush=True)
        print(json.dumps(pb.inproc(case, args, threads, seconds, engine)), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=pb.ROOT / "configs" / "local.yaml")
    p.add_argument("--case", default="512-jpeg-x2")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="threads of the in-process loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:  # the in-process loop, started by in_process()
        child_loop(opts.config, opts.case, opts.seconds, opts.threads)
        return 0

    [case] = pb.cases([opts.case])
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "config": str(opts.config),
        "case": opts.case, "load_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": [],
    }
    for _ in range(opts.repeats):
        work = Path(tempfile.mkdtemp(prefix="pe-profile-"))
        # The server's own folder: stop_server removes it, not the samples beside it.
        run = {"served": served(pb.app_args(opts.config, work / "server"), work / "server",
                                case, opts.seconds, opts.concurrency, work),
               "in_process": in_process(opts.config, opts.case, opts.seconds, opts.threads,
                                        work)}
        report["runs"].append(run)
        model, alone = run["served"]["Enhancer"], run["in_process"]
        least = run["served"]["work model"]
        print(f"{opts.case}: model replica {model['cpu_ms']:.1f} CPU ms per request, "
              f"Serve's least app's {least['cpu_ms']:.1f}, in process {alone['cpu_ms']:.1f}",
              flush=True)
        libs = set(model["ms_by_library"]) | set(alone["ms_by_library"]) | set(
            least["ms_by_library"])
        for lib in sorted(libs):
            a, w, b = (x["ms_by_library"].get(lib, 0.0) for x in (model, least, alone))
            print(f"  {lib:18s} replica {a:6.2f}  least app {w:6.2f}  in process {b:6.2f}  "
                  f"replica - least {a - w:+.2f}")
        for name in ("Ingress", "work ingress"):
            print(f"  {name}:", run["served"].get(name), flush=True)
    report["load_after"] = os.getloadavg()
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
