"""What a hostile request costs: CPU seconds and peak memory per server process, per case, and
a normal 512 px request's latency while the 8 costliest cases are sent over and over.

Starts its own one-machine Ray and the application from ``configs/dev.yaml`` (tiny synthetic
weights, temporary folders, a free port). For each case of ``tests/test_hostile.py`` and
``tests/test_bad_inputs.py`` (plus a body over ``max_bytes`` sent whole by ``urllib``) it
reads ``/proc/<pid>/stat`` (user + system CPU) and ``VmHWM`` (peak resident memory, reset
through ``clear_refs`` before each case) of the proxy, the ingress, the model replica and the
job actor. Targets (issue 9): no case over 2 s CPU or 512 MiB peak in any process; a normal
request within 1 s of its usual time under the load.

The load's senders are separate processes (one per sender), not threads beside the timed
request, so their work does not hold the timing client's GIL. An attacker's own CPU is not
the server's: ``--senders-nice 19`` runs them at the lowest priority, as near as one machine
gets to senders on other machines (the default, 0, lets them compete for the cores).

    .venv/bin/python loadtests/hostile_cost.py [--rounds 3] [--senders-nice 19] [--json F]

Not a test: it prints a table (and optionally JSON) for docs/SECURITY.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "loadtests"))

from job_memory_bench import find_pid  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PROCESSES = {
    "proxy": "ProxyActor",
    "ingress": "ServeReplica:photoenhance:Ingress",
    "model": "ServeReplica:photoenhance:Enhancer",
    "job actor": "JobManager",
}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def status_mib(pid: int, field: str = "VmHWM") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class Meter:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __enter__(self) -> Meter:
        for pid in self.pids.values():
            reset_peak(pid)
        self.cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self.rss0 = {n: status_mib(p, "VmRSS") for n, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = {n: round(cpu_seconds(p) - self.cpu0[n], 3) for n, p in self.pids.items()}
        self.peak = {n: round(status_mib(p), 1) for n, p in self.pids.items()}
        # What the case added: peak resident memory over the resident memory before it.
        self.growth = {n: round(max(self.peak[n] - self.rss0[n], 0.0), 1) for n in self.pids}


def cases(url: str, app_config: Any) -> list[tuple[str, Any]]:
    """(name, a function sending the request once) for every hostile case."""
    import httpx
    from conftest import SHARED_DATA, Images
    from test_bad_inputs import bad_requests
    from test_hostile import api_cases
    from test_http_hostile import json_body_cases

    out: list[tuple[str, Any]] = []
    for case in api_cases(Images):
        out.append((case.name, lambda c=case: httpx.request(
            c.method, url + c.path, timeout=120, **c.kwargs)))
    for name, kwargs, _status in bad_requests(Images, SHARED_DATA, app_config):
        if name.startswith("shared/"):
            continue
        out.append((f"image: {name}", lambda k=kwargs: httpx.post(
            url + "/v1/enhance", timeout=120, **k)))
    from test_codec_hostile import HTTP_CASES as metadata_cases  # issue 17's metadata files

    for name, (make, _status, _code) in metadata_cases.items():
        out.append((f"metadata: {name}", lambda body=make(): httpx.post(
            url + "/v1/enhance?upscale=1&face=false&bg_model=none", timeout=120, content=body,
            headers={"Content-Type": "application/octet-stream"})))
    big = b"\xff\xd8\xff" + b"\0" * (app_config.limits.max_bytes + 4 * 2**20)

    def urllib_413() -> None:
        request = urllib.request.Request(url + "/v1/enhance", data=big, method="POST",
                                         headers={"Content-Type": "image/jpeg"})
        try:
            urllib.request.urlopen(request, timeout=120)
        except urllib.error.HTTPError as err:
            err.read()

    out.append(("body over max_bytes, urllib", urllib_413))
    for name, kwargs, _status, _code in json_body_cases(app_config):
        out.append((name, lambda k=kwargs: httpx.post(url + "/v1/jobs", timeout=120, **k)))
    # Issue 17's case: 63 MiB of JSON (1.35 GB of ingress memory before). Sent whole by
    # urllib; past http.drain_max_bytes the server may close before urllib has sent it all.
    huge = b'{"inputs": [' + b'"a",' * (63 * 2**18 - 4) + b'"a"]}'

    def urllib_json() -> None:
        request = urllib.request.Request(url + "/v1/jobs", data=huge, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=120)
        except urllib.error.HTTPError as err:
            err.read()
        except OSError:
            pass  # the connection closed after the 413, before the body was all sent

    out.append(("JSON job: 63 MiB body, urllib", urllib_json))
    return out


def _good_request(url: str) -> None:
    import httpx
    from conftest import Images

    tiny = Images.cv2_bytes(Images.array(32, 32), ".png")
    httpx.post(url + "/v1/enhance", content=tiny, timeout=120,
               params={"upscale": 1, "face": "false", "bg_model": "none"})


def hammer(url: str, serve_args: dict[str, Any], case: str | None, nice: int, stop: Any,
           sent: Any) -> None:
    """A sender process: one case (None: a small good request) over and over until ``stop``;
    ``sent`` counts the requests it sent once timing began."""
    from serve_app.config import AppConfig

    os.nice(nice)
    if case is None:
        send = lambda: _good_request(url)  # noqa: E731
    else:
        send = dict(cases(url, AppConfig.model_validate(serve_args)))[case]
    while not stop.is_set():
        try:
            send()
        except Exception:
            time.sleep(0.1)
        with sent.get_lock():
            sent.value += 1


def cpu_by_process() -> dict[tuple[int, str], float]:
    """Every process's CPU seconds so far, keyed by (pid, a short name)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is None:
            continue
        cmd = p.info["cmdline"] or [p.info["name"] or "?"]
        name = cmd[0].rsplit("/", 1)[-1] if cmd[0].startswith("/") else cmd[0]
        if name.startswith("python") and len(cmd) > 1:  # a script: name it by the script
            name = " ".join(c.rsplit("/", 1)[-1] for c in cmd[1:3])
        out[(p.info["pid"], name[:48])] = t.user + t.system
    return out


def top_cpu(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float],
            wall: float, n: int = 8) -> dict[str, float]:
    """The ``n`` largest CPU users between two ``cpu_by_process`` snapshots, per second, with
    same-named processes added up (the 8 senders are one line)."""
    by_name: dict[str, float] = {}
    for key, cpu in after.items():
        by_name[key[1]] = by_name.get(key[1], 0.0) + cpu - before.get(key, 0.0)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:n]
    return {name: round(cpu / wall, 2) for name, cpu in top}


def normal_request(url: str, photo: bytes) -> float:
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/enhance", content=photo, timeout=120,
                   headers={"content-type": "image/jpeg"})
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Times each case is measured.")
    parser.add_argument("--normal", type=int, default=8, help="Normal requests timed per phase.")
    parser.add_argument("--senders-nice", type=int, default=0,
                        help="Niceness of the load's sender processes (19: lowest priority).")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default=None,
                        help="Measure only the cases whose name holds this text; no load phase.")
    args = parser.parse_args()

    import ray
    import yaml
    from conftest import Images
    from ray import serve

    from serve_app.config import APP_NAME, AppConfig
    from serve_app.deployments.app import build_app

    base = Path(tempfile.mkdtemp(prefix="pe-hostile-"))
    raw = yaml.safe_load((ROOT / "configs" / "dev.yaml").read_text())
    serve_args = dict(raw["applications"][0]["args"])
    serve_args["weights"] = {**serve_args.get("weights", {}), "dir": str(base / "weights")}
    serve_args["jobs"] = {**serve_args.get("jobs", {}), "data_dir": str(base / "data")}
    app_config = AppConfig.model_validate(serve_args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-pe-"), log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(serve_args), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        photo = Images.photo("0014.jpg", max_side=512)
        normal_request(url, photo)  # warm
        pids = {name: find_pid(title) for name, title in PROCESSES.items()}
        pids = {n: p for n, p in pids.items() if p}

        rows = []
        for name, send in cases(url, app_config):
            if args.only and args.only not in name:
                continue
            runs = []
            for _ in range(args.rounds):
                with Meter(pids) as meter:
                    send()
                runs.append(meter)
            worst = max(runs, key=lambda m: sum(m.cpu.values()))
            rows.append({"case": name, "cpu_s": worst.cpu, "peak_mib": worst.peak,
                         "growth_mib": {n: max(r.growth[n] for r in runs) for n in pids},
                         "cpu_total_s": round(sum(worst.cpu.values()), 3)})
            print(f"{name:<40} " + "  ".join(
                f"{n} {worst.cpu[n]:.2f}s/{worst.peak[n]:.0f}MiB/+{rows[-1]['growth_mib'][n]:.0f}"
                for n in pids), flush=True)
        if args.only:  # a few cases measured: no load phase
            print(json.dumps(rows, indent=2))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
            return 0

        baseline = [normal_request(url, photo) for _ in range(args.normal)]
        costly = sorted(rows, key=lambda r: -r["cpu_total_s"])[:8]
        # Spawned, not forked: this process holds Ray's threads.
        mp = multiprocessing.get_context("spawn")

        def under(load: list[str | None]) -> dict[str, Any]:
            """The normal request's times under ``load``, the load's rate and the server's
            CPU (all its processes, per second of wall time) meanwhile."""
            stop, sent = mp.Event(), mp.Value("l", 0)
            procs = [mp.Process(target=hammer, daemon=True,
                                args=(url, serve_args, c, args.senders_nice, stop, sent))
                     for c in load]
            for p in procs:
                p.start()
            time.sleep(5.0)  # the senders import, then send
            with sent.get_lock():
                sent.value = 0
            every0 = cpu_by_process()
            t0, cpu0 = time.monotonic(), sum(cpu_seconds(p) for p in pids.values())
            times = [normal_request(url, photo) for _ in range(args.normal)]
            wall = time.monotonic() - t0
            cpu = sum(cpu_seconds(p) for p in pids.values()) - cpu0
            every = top_cpu(every0, cpu_by_process(), wall)
            rate = sent.value / wall
            stop.set()
            for p in procs:
                p.join(timeout=120)
            return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
                    "load_requests_per_s": round(rate, 1),
                    "server_cpu_s_per_s": round(cpu / wall, 2), "top_cpu_s_per_s": every}

        loaded = under([r["case"] for r in costly])
        # Control: 8 senders of small *good* requests, to tell what the hostile ones cost
        # from what any 8 busy clients cost on the same cores.
        control = under([None] * 8)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)

    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU, configs/dev.yaml",
        "rounds": args.rounds,
        "senders": f"8 processes at niceness {args.senders_nice}",
        "cases": rows,
        "max_cpu_s": max(max(r["cpu_s"].values()) for r in rows),
        "max_peak_mib": max(max(r["peak_mib"].values()) for r in rows),
        "max_growth_mib": max(max(r["growth_mib"].values()) for r in rows),
        "worst_8": [r["case"] for r in costly],
        "normal_512px_s": {"alone_median": round(statistics.median(baseline), 3),
                           "under_load_median": loaded["median_s"],
                           "under_load_max": loaded["max_s"],
                           "under_8_good_clients_median": control["median_s"]},
        # What the load was and what it took from the server meanwhile.
        "load": {"worst_8": loaded, "good_8": control},
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "cases"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
