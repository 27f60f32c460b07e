"""Memory of a big job: the job actor's and the ingress's resident memory at 10% and 100%.

Starts its own one-machine Ray and the application from ``configs/dev.yaml`` (tiny
synthetic weights, a temporary data folder, a free port), writes N small PNGs, submits
them as one ``input_prefix`` job and samples ``/proc/<pid>/status`` (VmRSS: resident now;
VmHWM: peak resident so far) of both processes while the job runs. Growth between 10% and
100% should stay under 50 MB whatever N is: the job keeps 17 bytes an item, and streams
inputs, outputs and the manifest.

    .venv/bin/python loadtests/job_memory_bench.py --items 2000 [--size 32] [--json out.json]

Not a test: it prints a table (and optionally JSON) for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == ancestor:
                return True
    except OSError:
        return False
    return False


def find_pid(title: str) -> int | None:
    """Our Ray's process whose title (``ray::...``) contains ``title`` (other Ray instances
    on the machine may run the same application: only descendants of this process count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _descends_from(int(entry), os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and title in cmd:
            return int(entry)
    return None


def write_images(folder: Path, n: int, size: int) -> int:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        (folder / f"{i // 1000:03d}" / f"img{i:06d}.png").parent.mkdir(exist_ok=True)
        (folder / f"{i // 1000:03d}" / f"img{i:06d}.png").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32, help="Input side in pixels.")
    parser.add_argument("--upscale", type=int, default=2, choices=[1, 2, 4])
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here too.")
    args = parser.parse_args()

    import httpx
    import ray
    import yaml
    from ray import serve

    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    base = Path(tempfile.mkdtemp(prefix="pe-jobbench-"))
    raw = yaml.safe_load((ROOT / "configs" / "dev.yaml").read_text())
    serve_args = dict(raw["applications"][0]["args"])
    serve_args["weights"] = {**serve_args.get("weights", {}), "dir": str(base / "weights")}
    serve_args["jobs"] = {**serve_args.get("jobs", {}), "data_dir": str(base / "data")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    inputs = base / "data" / "inputs" / "bench"
    input_bytes = write_images(inputs, args.items, args.size)
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-pe-"), log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    figures: dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(serve_args), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/jobs", json={"input_prefix": str(inputs),
                                            "options": {"upscale": args.upscale, "face": False}})
            r.raise_for_status()
            job_id = r.json()["job_id"]
            from serve_app.jobs.manager import NAMESPACE

            actor = ray.get_actor(f"{APP_NAME}-jobs", namespace=NAMESPACE)
            pids = {"job actor": ray.get(actor.pid.remote()),
                    "ingress": find_pid(f"ServeReplica:{APP_NAME}:Ingress")}
            marks: dict[str, dict[str, dict[str, int]]] = {}
            start = time.monotonic()
            at10 = None
            while True:
                snap = http.get(f"/v1/jobs/{job_id}").json()
                mem = {name: proc_mem(pid) for name, pid in pids.items() if pid}
                if at10 is None and snap["total"] and snap["done"] >= 0.1 * args.items:
                    marks["10%"], at10 = mem, snap["done"]
                if snap["state"] in ("completed", "partial", "failed", "cancelled"):
                    marks["100%"] = mem
                    break
                time.sleep(0.2)
            elapsed = time.monotonic() - start
            figures = {
                "items": args.items,
                "input_side": args.size,
                "upscale": args.upscale,
                "input_bytes": input_bytes,
                "state": snap["state"],
                "counts": snap["counts"],
                "seconds": round(elapsed, 1),
                "items_per_s": round(args.items / elapsed, 1),
                "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
                "memory": {
                    name: {
                        mark: {k: round(v / 2**20, 1) for k, v in marks[mark][name].items()}
                        for mark in ("10%", "100%")
                    }
                    for name in pids if pids[name]
                },
            }
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)

    print(f"{figures['items']} items ({args.size}x{args.size} PNG, x{args.upscale}): "
          f"{figures['state']} in {figures['seconds']} s, {figures['items_per_s']} items/s")
    print(f"{'process':<10} {'RSS@10%':>9} {'RSS@100%':>9} {'growth':>8} "
          f"{'peak@10%':>9} {'peak@100%':>10}  (MiB)")
    for name, m in figures["memory"].items():
        growth = m["100%"]["VmRSS"] - m["10%"]["VmRSS"]
        print(f"{name:<10} {m['10%']['VmRSS']:>9} {m['100%']['VmRSS']:>9} {growth:>8.1f} "
              f"{m['10%']['VmHWM']:>9} {m['100%']['VmHWM']:>10}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
