"""Drive a ramp-up / hold / ramp-down load against a running server while sampling replica
(and node) counts, then write a report: ``<out>.json`` and ``<out>.png``.

    .venv/bin/python loadtests/run_scenario.py --base-url http://127.0.0.1:8000 \
        --locustfile interactive --stages 30:6,90:6,20:0 --user-rate 2 \
        --ray-address 127.0.0.1:6379 --tail-s 120 --out docs/loadtest-dev

Locust runs as a subprocess (it patches the process with gevent); this process samples.
Replica counts come from the Serve controller (``--ray-address``: a driver connects),
from the dashboard's REST API (``--dashboard-url``), or from Prometheus text on Ray's
metrics port (``--metrics-url``, repeatable); nodes need ``--ray-address``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pe_data import parse_stages  # noqa: E402

LOCUSTFILES = {
    "interactive": HERE / "locustfile_interactive.py",
    "jobs": HERE / "locustfile_jobs.py",
    "mix": HERE / "locustfile_mix.py",
}
Sample = dict[str, Any]


@dataclass
class Scenario:
    base_url: str
    locustfile: str = "interactive"
    stages: str = "30:6,90:6,20:0"
    user_rate: float = 1.0
    image_size: str = "96x64"
    options: str = ""
    job_files: int = 8
    app: str = "photoenhance"
    deployment: str = "Enhancer"
    ray_address: str | None = None
    dashboard_url: str | None = None
    metrics_urls: list[str] = field(default_factory=list)
    node_resource: str | None = None  # count nodes that carry it (e.g. GPU, fake_gpu)
    sample_every_s: float = 2.0
    lead_s: float = 5.0
    tail_s: float = 120.0
    out: str = "docs/loadtest"


# ------------------------------------------------------------------ sampling


def serve_details_source(scenario: Scenario) -> Callable[[], Sample]:
    """Counts from the Serve controller (and Ray's node table) through a connected driver."""
    import ray
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        ray.init(address=scenario.ray_address, log_to_driver=False, logging_level="WARNING")
    client = _get_global_client()

    def sample() -> Sample:
        out = _from_details(client.get_serve_details(), scenario)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        out["nodes"] = len(nodes)
        if scenario.node_resource:
            out["resource_nodes"] = sum(
                1 for n in nodes if n.get("Resources", {}).get(scenario.node_resource, 0) > 0
            )
        return out

    return sample


def rest_source(scenario: Scenario) -> Callable[[], Sample]:
    url = f"{scenario.dashboard_url.rstrip('/')}/api/serve/applications/"

    def sample() -> Sample:
        return _from_details(httpx.get(url, timeout=5).json(), scenario)

    return sample


def _from_details(details: dict[str, Any], scenario: Scenario) -> Sample:
    app = (details.get("applications") or {}).get(scenario.app) or {}
    dep = (app.get("deployments") or {}).get(scenario.deployment) or {}
    states: dict[str, int] = {}
    for replica in dep.get("replicas") or []:
        # The controller hands a driver ReplicaState enums; the REST API hands strings.
        state = str(getattr(replica.get("state"), "value", replica.get("state")))
        states[state] = states.get(state, 0) + 1
    return {
        "running": states.get("RUNNING", 0),
        "starting": sum(v for k, v in states.items() if k in {"STARTING", "PENDING_MIGRATION"}),
        "stopping": states.get("STOPPING", 0),
        "target": dep.get("target_num_replicas"),
    }


_PROM_NAMES = {
    "ray_serve_deployment_replica_healthy": "healthy",
    "ray_serve_autoscaling_target_replicas": "target",
    "ray_photoenhance_replicas_wanted": "wanted",
    "ray_photoenhance_queue_depth": "queue_depth",
    "ray_photoenhance_job_backlog": "job_backlog",
}


def metrics_source(scenario: Scenario) -> Callable[[], Sample]:
    """Sums of a few gauges over the given Prometheus endpoints (one per Ray node)."""
    from prometheus_client.parser import text_string_to_metric_families

    def sample() -> Sample:
        out: Sample = {}
        for url in scenario.metrics_urls:
            text = httpx.get(url, timeout=5).text
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    key = _PROM_NAMES.get(s.name)
                    if key and s.labels.get("deployment") == scenario.deployment and (
                        s.labels.get("application", scenario.app) == scenario.app
                    ):
                        out[f"m_{key}"] = out.get(f"m_{key}", 0.0) + s.value
        # Healthy replicas and Serve's target are what a driver's sampler calls running and
        # target: the same keys let the events and the plot read either source.
        for src, dst in (("m_healthy", "running"), ("m_target", "target")):
            if src in out:
                out[dst] = int(out[src])
        return out

    return sample


class Sampler(threading.Thread):
    def __init__(self, sources: list[Callable[[], Sample]], every_s: float) -> None:
        super().__init__(daemon=True)
        self.sources, self.every_s = sources, every_s
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(self.sample_once())
            self._stop_event.wait(self.every_s)

    def sample_once(self) -> Sample:
        sample: Sample = {"t": time.time()}
        for source in self.sources:
            try:
                sample.update(source())
            except Exception as exc:  # keep sampling through a hiccup
                self.errors += 1
                sample.setdefault("errors", []).append(repr(exc)[:200])
        return sample

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


# ------------------------------------------------------------------ running


def locust_command(scenario: Scenario, csv_prefix: str) -> tuple[list[str], dict[str, str]]:
    stages = parse_stages(scenario.stages)
    path = LOCUSTFILES.get(scenario.locustfile, Path(scenario.locustfile))
    total = sum(s for s, _ in stages)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(path), "--headless",
        "-H", scenario.base_url, "--csv", csv_prefix, "--csv-full-history",
        "--run-time", f"{int(total + 30)}s", "--stop-timeout", "30",
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]
    env = {
        **os.environ,
        "PE_STAGES": scenario.stages,
        "PE_USER_RATE": str(scenario.user_rate),
        "PE_IMAGE_SIZE": scenario.image_size,
        "PE_OPTIONS": scenario.options,
        "PE_JOB_FILES": str(scenario.job_files),
    }
    return cmd, env


def run(scenario: Scenario, settle: Callable[[list[Sample]], bool] | None = None) -> dict[str, Any]:
    """Run the scenario and write the report; returns it. ``settle(samples)`` ends the tail
    early (default: the replica count is back where it was before the load)."""
    sources = []
    if scenario.ray_address:
        sources.append(serve_details_source(scenario))
    elif scenario.dashboard_url:
        sources.append(rest_source(scenario))
    if scenario.metrics_urls:
        sources.append(metrics_source(scenario))
    sampler = Sampler(sources, scenario.sample_every_s)
    sampler.start()
    time.sleep(scenario.lead_s)
    baseline = [s for s in sampler.samples if "running" in s]
    settle = settle or _back_to(baseline[-1]["running"] if baseline else None)

    work = Path(tempfile.mkdtemp(prefix="pe-load-"))
    cmd, env = locust_command(scenario, str(work / "locust"))
    started = time.time()
    with open(work / "locust.log", "wb") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    ended = time.time()
    deadline = ended + scenario.tail_s
    while time.time() < deadline and not settle(sampler.samples):
        time.sleep(scenario.sample_every_s)
    sampler.stop()

    report = build_report(scenario, work, sampler.samples, started, ended)
    report["locust_exit_code"] = code
    report["sampler_errors"] = sampler.errors
    if code != 0:
        report["locust_log_tail"] = (work / "locust.log").read_text(errors="replace")[-3000:]
    write_report(report, Path(scenario.out))
    shutil.rmtree(work, ignore_errors=True)
    return report


def _back_to(running: int | None) -> Callable[[list[Sample]], bool]:
    def settled(samples: list[Sample]) -> bool:
        return running is not None and bool(samples) and samples[-1].get("running") == running
    return settled


# ------------------------------------------------------------------ the report


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def build_report(
    scenario: Scenario, work: Path, samples: list[Sample], started: float, ended: float
) -> dict[str, Any]:
    stats = _read_csv(work / "locust_stats.csv")
    history = [r for r in _read_csv(work / "locust_stats_history.csv") if r.get("Name") == "Aggregated"]
    users = [(float(r["Timestamp"]), int(float(r["User Count"]))) for r in history]
    active = [t for t, n in users if n > 0]
    load_start = active[0] - 1.0 if active else started
    load_end = active[-1] + 1.0 if active else ended
    duration = max(load_end - load_start, 1e-9)

    routes, errors = {}, {}
    for row in stats:
        name = row["Name"]
        if name == "Aggregated":
            continue
        count = int(float(row["Request Count"]))
        if "[HTTP " in name:
            status = name.rsplit("[HTTP ", 1)[1].rstrip("]")
            errors[status] = errors.get(status, 0) + count
            continue
        routes[f"{row['Type']} {name}"] = {
            "count": count,
            "failures": int(float(row["Failure Count"])),
            "rps": round(count / duration, 3),
            "p50_ms": _num(row.get("50%")),
            "p95_ms": _num(row.get("95%")),
            "p99_ms": _num(row.get("99%")),
            "max_ms": _num(row.get("Max Response Time")),
        }
    total = sum(int(float(r["Request Count"])) for r in stats if r["Name"] != "Aggregated")
    rel = [{**s, "t": round(s["t"] - load_start, 2)} for s in samples]
    return {
        "scenario": asdict(scenario),
        "machine": {
            "host": platform.node(),
            "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
        },
        "load_start_unix": load_start,
        "load_seconds": round(duration, 2),
        "requests": total,
        "throughput_rps": round(total / duration, 3),
        "routes": routes,
        "errors_by_status": errors,
        "timeline": [
            {"t": round(float(r["Timestamp"]) - load_start, 2), "users": int(float(r["User Count"])),
             "rps": _num(r.get("Requests/s")), "fails_per_s": _num(r.get("Failures/s")),
             "p50_ms": _num(r.get("50%")), "p95_ms": _num(r.get("95%"))}
            for r in history
        ],
        "samples": rel,
        "replica_events": events(rel, "running", duration),
        "node_events": events(rel, "nodes", duration),
        "resource_node_events": events(rel, "resource_nodes", duration),
    }


def events(samples: list[Sample], key: str, load_end: float) -> list[dict[str, Any]]:
    """Each change of ``samples[key]``: when, from, to, and its time from load start (ups)
    or from load end (downs after the load)."""
    out, last = [], None
    for s in samples:
        value = s.get(key)
        if value is None:
            continue
        if last is not None and value != last:
            event = {"t": s["t"], "from": last, "to": value, "kind": "up" if value > last else "down"}
            if event["kind"] == "up":
                event["since_load_start_s"] = s["t"]
            elif s["t"] >= load_end:
                event["since_load_end_s"] = round(s["t"] - load_end, 2)
            out.append(event)
        last = value
    return out


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, out.with_suffix(".png"))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl, samples = report["timeline"], report["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    ax.plot([r["t"] for r in tl], [r["users"] for r in tl], label="users", color="gray")
    ax2 = ax.twinx()
    ax2.plot([r["t"] for r in tl], [r["rps"] or 0 for r in tl], label="requests/s")
    ax2.plot([r["t"] for r in tl], [r["fails_per_s"] or 0 for r in tl], label="failures/s", color="red")
    ax.set_ylabel("users")
    ax2.set_ylabel("per second")
    ax2.legend(loc="upper right")
    axes[1].plot([r["t"] for r in tl], [r["p50_ms"] for r in tl], label="p50")
    axes[1].plot([r["t"] for r in tl], [r["p95_ms"] for r in tl], label="p95")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend(loc="upper right")
    ax = axes[2]
    for key, style in (("running", "-"), ("target", "--"), ("nodes", ":"), ("resource_nodes", "-.")):
        points = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
        if points:
            ax.step([p[0] for p in points], [p[1] for p in points], style, where="post", label=key)
    ax.set_ylabel("replicas / nodes")
    ax.set_xlabel("seconds since load start")
    ax.legend(loc="upper right")
    for a in axes:
        a.axvline(0, color="green", alpha=0.4)
        a.axvline(report["load_seconds"], color="black", alpha=0.4)
    r = report["scenario"]
    fig.suptitle(f"{r['locustfile']} {r['stages']} x{r['user_rate']}/s: "
                 f"{report['throughput_rps']} req/s, errors {report['errors_by_status'] or 'none'}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> Scenario:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Scenario(base_url="")
    p.add_argument("--base-url", required=True)
    p.add_argument("--locustfile", default=d.locustfile, help="interactive, jobs, mix, or a path")
    p.add_argument("--stages", default=d.stages, help="seconds:users,... (ramp, hold, ramp down)")
    p.add_argument("--user-rate", type=float, default=d.user_rate, help="requests/s per user")
    p.add_argument("--image-size", default=d.image_size)
    p.add_argument("--options", default=d.options, help="query string, e.g. upscale=2")
    p.add_argument("--job-files", type=int, default=d.job_files)
    p.add_argument("--app", default=d.app)
    p.add_argument("--deployment", default=d.deployment)
    p.add_argument("--ray-address", help="connect a driver: Serve details and nodes")
    p.add_argument("--dashboard-url", help="Serve REST API instead of a driver")
    p.add_argument("--metrics-url", action="append", default=[], dest="metrics_urls")
    p.add_argument("--node-resource", help="also count nodes carrying this resource")
    p.add_argument("--sample-every-s", type=float, default=d.sample_every_s)
    p.add_argument("--lead-s", type=float, default=d.lead_s)
    p.add_argument("--tail-s", type=float, default=d.tail_s)
    p.add_argument("--out", default=d.out, help="report path without suffix")
    return Scenario(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    report = run(parse_args(argv))
    summary = {k: report[k] for k in ("requests", "throughput_rps", "errors_by_status", "replica_events")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
