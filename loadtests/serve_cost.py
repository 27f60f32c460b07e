"""What Ray's dashboard costs `photoenhance serve`: start time to a ready application and the
memory of the whole process tree (driver, Ray's daemons, replicas), with and without it.

    .venv/bin/python loadtests/serve_cost.py --config configs/dev.yaml --runs 2

Each run starts `photoenhance serve` on a free port, waits for `GET /readyz` to answer 200,
waits 5 s more for the tree to settle, sums the resident memory (RSS and, where readable,
PSS) of every process below it, then stops it with SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from serve_app.client import wait_ready

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_memory(pid: int) -> dict[str, float]:
    rss = pss = 0
    names: dict[str, int] = {}
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            name = p.name()
            names[name] = names.get(name, 0) + info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"processes": len(procs), "rss_mib": rss / 2**20, "pss_mib": pss / 2**20}


def one_run(config: str, dashboard: bool) -> dict[str, float]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "photoenhance"), "serve", "--config", config,
           "--port", str(port), "--dashboard" if dashboard else "--no-dashboard"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 600, alive=lambda: proc.poll() is None,
                   every_s=0.25)
        ready_s = time.monotonic() - t0
        time.sleep(5)
        return {"dashboard": dashboard, "ready_s": round(ready_s, 1),
                **{k: round(v, 1) for k, v in tree_memory(proc.pid).items()}}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/dev.yaml")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    results = []
    for _ in range(args.runs):
        for dashboard in (False, True):  # interleaved, so a busy moment hits both
            results.append(one_run(args.config, dashboard))
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"loadavg": os.getloadavg(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
