"""Cluster autoscaling on one machine: a fake multi-node Ray cluster whose worker type
carries a GPU-like resource, the app deployed with its model replicas needing it, and a
load scenario that makes Serve ask for replicas and the Ray autoscaler add and remove nodes.

    .venv/bin/python cluster/fake_cluster.py --out docs/loadtest-fake-cluster
    .venv/bin/python cluster/fake_cluster.py --scale-out 1,2,3   # plumbing scale-out benchmark
    .venv/bin/python cluster/fake_cluster.py --node-death --out /tmp/node-death   # a node dies
    .venv/bin/python cluster/fake_cluster.py --head-restart --out /tmp/head   # the head restarts

The cluster keeps to itself: its head starts in its own temp dir on free ports (GCS, client
server, dashboard agent), the fake nodes join that GCS only, and ``shutdown`` ends only the
processes of that temp dir and their children, by PID (never ``ray stop``), so other Ray
instances on the machine live on. (Ray's ``AutoscalingCluster.start``/``shutdown`` run
``ray stop --force``, which ends every Ray process here: both are replaced below.)

The head has CPUs only (the ingress, the controller and the job actor live there); each
``gpu_sim`` worker node has 1 CPU and 1 ``fake_gpu``, and each model replica needs one
``fake_gpu``, so every replica beyond the nodes present is a pending one, which is what makes
the autoscaler launch a node. Idle nodes go after ``--idle-timeout-min``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from serve_app.client import wait_ready

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = Path(__file__).with_name("fake_multinode.yaml")
DEV_CONFIG = ROOT / "configs" / "dev.yaml"
WORKER_TYPE = "gpu_sim"
RESOURCE = "fake_gpu"
HEAD_CPUS = 2

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_class() -> type:
    from ray.cluster_utils import AutoscalingCluster

    class FakeGpuCluster(AutoscalingCluster):
        """AutoscalingCluster whose base config is ``cluster/fake_multinode.yaml`` and that
        starts and stops only its own processes (``address`` once started)."""

        address: str | None = None
        temp_dir: Path | None = None
        later_heads: list[Path] = []  # temp dirs of heads started again (--head-restart)

        def _generate_config(
            self,
            head_resources: dict[str, Any],
            worker_node_types: dict[str, Any],
            autoscaler_v2: bool = False,
            **config_kwargs: Any,
        ) -> dict[str, Any]:
            return generate_config(head_resources, worker_node_types, **config_kwargs)

        def start(self, _system_config: Any = None, override_env: dict[str, str] | None = None) -> None:
            # A loaded machine can miss Ray's fixed 30 s wait for the head's raylet: retry
            # with a fresh temp dir and ports, after stopping what the failed try started.
            for attempt in range(3):
                try:
                    self._start_once(override_env)
                    return
                except subprocess.CalledProcessError:
                    self.shutdown()
                    if attempt == 2:
                        raise

        def _start_once(self, override_env: dict[str, str] | None) -> None:
            import ray

            # Short: Ray's socket paths live under it and must stay within the Unix limit.
            self.temp_dir = Path(tempfile.mkdtemp(prefix="pefc-", dir="/tmp"))
            ip = ray._private.services.get_node_ip_address()
            port = free_port()
            self.address = f"{ip}:{port}"
            self._config.setdefault("provider", {})["gcs_address"] = self.address
            config_file = self.temp_dir / "autoscaling.json"
            config_file.write_text(json.dumps(self._config))
            cmd = [
                "ray", "start", "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
                f"--autoscaling-config={config_file}",
                f"--num-cpus={self._head_resources.get('CPU', HEAD_CPUS)}",
                "--include-dashboard=false", "--dashboard-agent-listen-port=0",
                f"--ray-client-server-port={free_port()}",
            ]
            env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                   # a loaded machine can miss the raylet's wait for its agents
                   "RAY_agent_register_timeout_ms": "120000",
                   # loopback only; the driver (this process) connects without a token
                   "RAY_AUTH_MODE": "disabled", **(override_env or {})}
            subprocess.check_call(cmd, env=env)

        def shutdown(self) -> None:
            for head in self.later_heads:
                stop_own_processes(head)
            if self.temp_dir is not None:
                stop_own_processes(self.temp_dir)

    return FakeGpuCluster


def own_processes(temp_dir: Path) -> list[Any]:
    """The processes of the cluster in ``temp_dir``: those whose command line names it (GCS,
    raylets, the autoscaler monitor and agents) and all their descendants (workers, whose
    titles Ray rewrites, and the fake nodes' raylets, children of the monitor)."""
    import psutil

    mark = str(temp_dir)
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(mark in part for part in proc.info["cmdline"] or ()):
                roots.append(proc)
        except psutil.Error:
            continue
    found: dict[int, Any] = {}
    for root in roots:
        found[root.pid] = root
        try:
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_own_processes(temp_dir: Path, grace_s: float = 10.0) -> None:
    """SIGTERM this cluster's processes, SIGKILL what is left after ``grace_s``."""
    import psutil

    procs = own_processes(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive + own_processes(temp_dir):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def generate_config(
    head_resources: dict[str, Any], worker_node_types: dict[str, Any], **config_kwargs: Any
) -> dict[str, Any]:
    """What AutoscalingCluster builds from Ray's example.yaml, built from ours."""
    config = copy.deepcopy(yaml.safe_load(BASE_CONFIG.read_text()))
    config["available_node_types"] = copy.deepcopy(worker_node_types)
    config["available_node_types"]["ray.head.default"] = {
        "resources": dict(head_resources),
        "node_config": {},
        "max_workers": 0,
    }
    config.update(config_kwargs)
    return config


def worker_node_types(max_workers: int) -> dict[str, Any]:
    return {
        WORKER_TYPE: {
            "resources": {"CPU": 1, RESOURCE: 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": max_workers,
        }
    }


def app_args(max_replicas: int, data: Path, min_replicas: int = 1) -> dict[str, Any]:
    """configs/dev.yaml's app, its model replicas pinned to ``fake_gpu`` nodes and scaling
    fast enough to watch."""
    args = copy.deepcopy(yaml.safe_load(DEV_CONFIG.read_text())["applications"][0]["args"])
    args["weights"] = {**args.get("weights", {}), "dir": str(data / "weights")}
    args["jobs"] = {**args.get("jobs", {}), "data_dir": str(data / "jobs")}
    model = args.setdefault("model", {})
    model.update({"num_cpus": 1, "num_gpus": 0, "resources": {RESOURCE: 1}})
    model["autoscaling"] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": min_replicas,
        "allow_scale_to_zero": min_replicas == 0,
        "target_queue_depth": 2,
        "upscale_delay_s": 5,
        "downscale_delay_s": 20,
        "metrics_interval_s": 1,
        "look_back_period_s": 5,
    }
    return args


@contextlib.contextmanager
def joined(cluster: Any) -> Iterator[None]:
    """Start the fake cluster and connect this driver; Serve, Ray and every fake node stop on
    the way out, whatever happened inside."""
    import ray
    from ray import serve

    try:
        cluster.start()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        yield
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.shutdown()


def run(opts: argparse.Namespace) -> dict[str, Any]:
    import run_scenario
    from ray import serve

    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    data = Path(tempfile.mkdtemp(prefix="pe-fake-cluster-"))
    cluster = cluster_class()(
        head_resources={"CPU": HEAD_CPUS},
        worker_node_types=worker_node_types(opts.max_workers),
        max_workers=opts.max_workers,
        idle_timeout_minutes=opts.idle_timeout_min,
    )
    with joined(cluster):
        # One proxy, on the head: a proxy actor on a worker keeps that node from going idle.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": opts.port})
        serve.run(build_app(app_args(opts.max_workers, data, opts.min_replicas)),
                  name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{opts.port}"
        wait_ready(url, opts.ready_timeout_s, every_s=2)
        min_nodes = opts.min_replicas

        def settled(samples: list[dict[str, Any]]) -> bool:
            last = samples[-1] if samples else {}
            return last.get("running") == opts.min_replicas and last.get("resource_nodes") == min_nodes

        scenario = run_scenario.Scenario(
            base_url=url,
            locustfile=opts.locustfile,
            stages=opts.stages,
            user_rate=opts.user_rate,
            app=APP_NAME,
            deployment="Enhancer",
            ray_address=cluster.address,
            node_resource=RESOURCE,
            sample_every_s=2,
            tail_s=opts.idle_timeout_min * 60 + 20 + opts.tail_margin_s,
            out=opts.out,
        )
        report = run_scenario.run(scenario, settle=settled)
        report["cluster"] = {
            "head_cpus": HEAD_CPUS,
            "worker_type": worker_node_types(opts.max_workers),
            "idle_timeout_minutes": opts.idle_timeout_min,
            "app_model": app_args(opts.max_workers, data, opts.min_replicas)["model"],
        }
        Path(opts.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        return report


def pin_fake_nodes(temp_dir: Path) -> dict[int, int]:
    """Give each fake node one real core (``taskset``), as a real node has its own CPUs:
    node raylets (children of the autoscaler monitor) and their descendants, round robin
    over this process's cores. Workers started later inherit their raylet's affinity."""
    import psutil

    cores = sorted(os.sched_getaffinity(0))
    pinned: dict[int, int] = {}
    raylets = []
    for proc in own_processes(temp_dir):
        with contextlib.suppress(psutil.Error):
            if "monitor.py" in " ".join(proc.cmdline()):
                raylets += [c for c in proc.children() if c.name() == "raylet"]
    for i, raylet in enumerate(sorted(raylets, key=lambda p: p.pid)):
        core = cores[i % len(cores)]
        try:
            family = [raylet, *raylet.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            with contextlib.suppress(psutil.Error, subprocess.CalledProcessError):
                subprocess.check_call(["taskset", "-a", "-p", "-c", str(core), str(proc.pid)],
                                      stdout=subprocess.DEVNULL)
        pinned[raylet.pid] = core
    return pinned


def run_scale_out(opts: argparse.Namespace) -> dict[str, Any]:
    """Null-engine throughput through the head's proxy and ingress with 1, 2, 3 model
    replicas, each on its own fake node (its own core)."""
    import asyncio
    import statistics

    import plumbing_bench
    import ray
    from ray import serve

    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    counts = [int(n) for n in opts.scale_out.split(",")]
    nodes = max(counts)
    data = Path(tempfile.mkdtemp(prefix="pe-fake-cluster-"))
    types = worker_node_types(nodes)
    types[WORKER_TYPE]["min_workers"] = nodes
    cluster = cluster_class()(
        head_resources={"CPU": HEAD_CPUS}, worker_node_types=types, max_workers=nodes,
        idle_timeout_minutes=60,
    )
    [case] = plumbing_bench.cases([opts.case])
    report: dict[str, Any] = {"case": opts.case, "concurrency": opts.concurrency, "runs": {}}
    with joined(cluster):
        deadline = time.time() + opts.ready_timeout_s
        while sum(n.get("Resources", {}).get(RESOURCE, 0) for n in ray.nodes() if n["Alive"]) < nodes:
            if time.time() > deadline:
                raise TimeoutError(f"{nodes} fake nodes did not start")
            time.sleep(2)
        report["pinned"] = pin_fake_nodes(cluster.temp_dir)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": opts.port})
        url = f"http://127.0.0.1:{opts.port}"
        for n in counts:
            args = app_args(n, data, n)
            # More CPU than a fake node has: the ingress can only be placed on the head; its
            # door sized for the replicas (not dev.yaml's 8 in flight, a test setting).
            args["ingress"] = {**args.get("ingress", {}), "num_cpus": HEAD_CPUS - 0.5,
                               "max_inflight": None, "queue_timeout_s": 60}
            serve.run(build_app(args), name=APP_NAME, route_prefix="/")
            wait_ready(url, opts.ready_timeout_s, every_s=2)
            asyncio.run(plumbing_bench.http_window(url, case, opts.concurrency, 5))  # warm-up
            runs = [asyncio.run(plumbing_bench.http_window(url, case, opts.concurrency, opts.seconds))
                    for _ in range(opts.repeats)]
            rps = [r["rps"] for r in runs]
            report["runs"][n] = {"rps": rps, "median": statistics.median(rps),
                                 "errors": sum(r["errors"] for r in runs)}
            print(f"{n} replica(s): {statistics.median(rps):.1f} req/s {rps}", flush=True)
        base = report["runs"][counts[0]]["median"]
        for n in counts:
            report["runs"][n]["speedup"] = report["runs"][n]["median"] / base
        report["load_after"] = os.getloadavg()
        Path(opts.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        return report


class Clients:
    """Interactive clients: each sends a small PNG to ``POST /v1/enhance``, and on a 503 waits
    its ``Retry-After`` and sends it again, as a client that honours it does, until a 200 (or
    ``give_up_s``). Every attempt is recorded; an attempt that has no answer within
    ``deadline_s`` is a hang."""

    def __init__(self, url: str, n: int, deadline_s: float, give_up_s: float = 600.0,
                 retry_refused: bool = False) -> None:
        import threading

        self.url, self.deadline_s, self.give_up_s = url, deadline_s, give_up_s
        # A refused connection is retried after 1 s where no proxy may be listening for a
        # while (the head, the only proxy, restarting); else it ends the request.
        self.retry_refused = retry_refused
        self.stop = threading.Event()
        self.attempts: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(self.give_up_s + self.deadline_s + 30)

    def _loop(self, worker: int) -> None:
        import httpx

        body = png_bytes(worker)
        with httpx.Client(timeout=self.deadline_s) as client:
            while not self.stop.is_set():
                self._one(client, body)
                time.sleep(0.5)

    def _one(self, client: Any, body: bytes) -> None:
        import httpx

        first = time.time()
        tries = 0
        final: int | str = "gave_up"
        while time.time() - first < self.give_up_s:
            tries += 1
            t0 = time.time()
            rec: dict[str, Any] = {"t": t0}
            try:
                r = client.post(f"{self.url}/v1/enhance?upscale=1&face=false", content=body,
                                headers={"Content-Type": "image/png"})
                rec.update(status=r.status_code, retry_after=r.headers.get("Retry-After"))
                if r.status_code != 200:
                    with contextlib.suppress(ValueError):
                        rec["code"] = r.json().get("error", {}).get("code")
            except httpx.TimeoutException:
                rec["status"] = "hang"
            except httpx.HTTPError as exc:
                rec["status"] = f"transport:{type(exc).__name__}"
            rec["seconds"] = time.time() - t0
            with self._lock:
                self.attempts.append(rec)
            if self.retry_refused and rec["status"] == "transport:ConnectError":
                time.sleep(1)
                continue
            if rec["status"] != 503 or rec.get("retry_after") is None:
                final = rec["status"]
                break
            time.sleep(min(float(rec["retry_after"]), 30.0))
        with self._lock:
            self.requests.append({"t": first, "tries": tries, "final": final,
                                  "seconds": time.time() - first})


def png_bytes(seed: int, side: int = 48) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def model_replicas() -> list[dict[str, Any]]:
    """The model deployment's replica actors, from the GCS (no dashboard needed):
    ``{actor_id, node_id, state}``."""
    import ray

    found = []
    for actor_id, info in ray._private.state.actors().items():
        if "Enhancer" in (info.get("ActorClassName") or ""):
            found.append({"actor_id": actor_id, "node_id": info["Address"]["NodeID"],
                          "state": info["State"]})
    return found


def gcs_nodes() -> dict[str, dict[str, Any]]:
    """Every node the GCS knows, alive or dead, by node id."""
    import ray

    return {n["NodeID"]: n for n in ray.nodes()}


def kill_node(temp_dir: Path, node: dict[str, Any]) -> dict[str, Any]:
    """SIGKILL one fake node as a dead machine would go: its raylet and every process under it
    (workers, agents), at once. The raylet is found by its socket path among this cluster's
    own processes only. Fake nodes' raylets share the autoscaler monitor's process group
    (Ray starts them without ``setsid``), so killing by group would take the head's daemons
    too: the group is killed only where the raylet leads its own."""
    import psutil

    socket_name = node["RayletSocketName"]
    raylets = [p for p in own_processes(temp_dir)
               if p.name() == "raylet" and f"--raylet_socket_name={socket_name}" in p.cmdline()]
    if len(raylets) != 1:
        raise RuntimeError(f"raylet of node {node['NodeID']} not found ({len(raylets)} matches)")
    [raylet] = raylets
    family = [raylet, *raylet.children(recursive=True)]
    names = sorted({p.name() for p in family})
    pgid = os.getpgid(raylet.pid)
    by_group = pgid == raylet.pid
    if by_group:
        os.killpg(pgid, signal.SIGKILL)
    for proc in family:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    # They stay zombies until the monitor (their parent) reaps them: wait for that state, not
    # for their end (psutil.wait_procs would wait its whole timeout).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in family):
        time.sleep(0.05)
    return {"raylet_pid": raylet.pid, "pids": sorted(p.pid for p in family),
            "names": names,
            "killed_by": "process group" if by_group else "raylet and descendants"}


def _running(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def run_node_death(opts: argparse.Namespace) -> dict[str, Any]:
    """A model replica's node is SIGKILLed while a job runs and interactive clients send
    requests: what they saw, what the job recorded, and when Serve and the autoscaler put
    the replica and a node back."""
    import httpx
    from ray import serve

    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    data = Path(tempfile.mkdtemp(prefix="pe-node-death-"))
    folder = data / "jobs" / "inputs" / "node-death"
    folder.mkdir(parents=True)
    for i in range(opts.items):
        (folder / f"n{i:03d}.png").write_bytes(png_bytes(1000 + i))
    cluster = cluster_class()(
        head_resources={"CPU": HEAD_CPUS}, worker_node_types=worker_node_types(opts.max_workers),
        max_workers=opts.max_workers, idle_timeout_minutes=opts.idle_timeout_min,
    )
    report: dict[str, Any] = {"items": opts.items, "clients": opts.clients}
    with joined(cluster):
        assert cluster.temp_dir is not None
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": opts.port})
        args = app_args(1, data)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{opts.port}"
        wait_ready(url, opts.ready_timeout_s, every_s=2)
        ingress = args["ingress"]
        # An attempt's deadline: the door's wait plus the ingress's model deadline, and slack.
        deadline_s = ingress["queue_timeout_s"] + ingress["request_timeout_s"] + 30
        report["deadline_s"] = deadline_s
        clients = Clients(url, opts.clients, deadline_s)
        clients.start()
        r = httpx.post(f"{url}/v1/jobs", timeout=60, json={
            "input_prefix": str(folder), "max_inflight": 2,
            "options": {"face": False, "upscale": 1}})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        report["job_id"] = job_id

        def job() -> dict[str, Any]:
            return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()

        t_end = time.time() + opts.ready_timeout_s
        while job()["done"] < opts.kill_after_items:
            if time.time() > t_end:
                raise TimeoutError("the job did not get going")
            time.sleep(0.2)
        [victim] = [a for a in model_replicas() if a["state"] == "ALIVE"]
        node = gcs_nodes()[victim["node_id"]]
        report["job_done_at_kill"] = job()["done"]
        report["placement"] = {
            "model_replica_node": victim["node_id"],
            "job_actor_node": _actor_node("JobManager"),
            "ingress_node": _actor_node("Ingress"),
        }
        t_kill = time.time()
        report["kill"] = kill_node(cluster.temp_dir, node)
        events: dict[str, float] = {}
        samples = []
        while True:
            # Each fact is timed when it was read: a call can block for seconds while the
            # cluster notices the death.
            nodes = gcs_nodes()
            t_nodes = time.time() - t_kill
            replicas = model_replicas()
            now = time.time() - t_kill
            snap = job()
            if t_nodes < now - 2 or time.time() - t_kill > now + 2:
                report.setdefault("slow_reads", []).append(
                    {"nodes_at": round(t_nodes, 1), "replicas_at": round(now, 1),
                     "job_at": round(time.time() - t_kill, 1)})
            new_nodes = [i for i, n in nodes.items() if n["Alive"] and i != victim["node_id"]
                         and n.get("Resources", {}).get(RESOURCE)]
            running = [a for a in replicas if a["state"] == "ALIVE"
                       and a["node_id"] != victim["node_id"]]
            if not nodes[victim["node_id"]]["Alive"]:
                events.setdefault("node_dead_in_gcs", t_nodes)
            if not [a for a in replicas if a["actor_id"] == victim["actor_id"]
                    and a["state"] == "ALIVE"]:
                events.setdefault("replica_dead_in_gcs", now)
            if new_nodes:
                events.setdefault("new_node_alive", t_nodes)
            if running:
                events.setdefault("new_replica_alive", now)
            ok_after = [a["t"] + a["seconds"] - t_kill for a in clients.attempts
                        if a["status"] == 200 and a["t"] > t_kill]
            if ok_after and running:
                events.setdefault("first_200_after_kill", min(ok_after))
            samples.append({"t": round(now, 1), "alive_fake_gpu_nodes": len(new_nodes),
                            "replicas": [a["state"] for a in replicas], "job_done": snap["done"],
                            "job_state": snap["state"]})
            if snap["state"] in ("completed", "partial", "failed", "cancelled") and \
                    "first_200_after_kill" in events:
                break
            if now > opts.recover_timeout_s:
                report["timed_out"] = True
                break
            time.sleep(0.5)
        report["job_end_s"] = time.time() - t_kill
        clients.join()
        report["events_s"] = {k: round(v, 1) for k, v in events.items()}
        report["samples"] = samples
        report["job"] = job()
        manifest = data / "jobs" / "jobs" / job_id / "manifest.jsonl"
        records = [json.loads(x) for x in manifest.read_text().splitlines()]
        report["manifest"] = {
            "records": len(records), "indices": sorted(x["index"] for x in records),
            "retried": sorted(x["index"] for x in records if x.get("attempts", 1) > 1),
            "failed": [x for x in records if x.get("error")],
        }
        report["attempts"] = [{**a, "t": round(a["t"] - t_kill, 2)} for a in clients.attempts]
        report["requests"] = [{**q, "t": round(q["t"] - t_kill, 2)} for q in clients.requests]
        report["load_after"] = os.getloadavg()
        report["gcs_nodes_after"] = {i: {"alive": n["Alive"], "resources": n.get("Resources")}
                                     for i, n in gcs_nodes().items()}
    Path(opts.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """Debian's redis-server on loopback, on a free port, without snapshots: the GCS's
    external storage for fault tolerance (its tables live in Redis's memory)."""
    import shutil

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def head_processes(temp_dir: Path) -> list[Any]:
    """The head "pod": every process of the cluster except the fake worker nodes' raylets and
    what runs under them."""
    import psutil

    procs = own_processes(temp_dir)
    workers: set[int] = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.name() == "raylet" and "--head" not in proc.cmdline():
                workers |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    return [p for p in procs if p.pid not in workers]


def restart_head(cluster: Any, gcs_env: dict[str, str]) -> Path:
    """``ray start --head`` again, as KubeRay's new head pod would: the same GCS port and
    Redis, an empty temp dir (a new pod's /tmp). Two things of a single machine are avoided:
    ``ray start`` refuses a port that local processes name in ``--gcs-address`` (the live
    worker nodes' do) when the temp dir's ``ray_current_cluster`` names it too; and with
    ``RAY_FAKE_CLUSTER`` it pins the head's node id to the old head's, which the GCS holds as
    dead. So: a new temp dir, and no fake provider (the restarted head has no autoscaler)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="pefc-head-", dir="/tmp"))
    cluster.later_heads.append(temp_dir)
    port = cluster.address.rsplit(":", 1)[1]
    cmd = ["ray", "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
           f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false",
           "--dashboard-agent-listen-port=0", f"--ray-client-server-port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_FAKE_CLUSTER"}
    env.update({"RAY_agent_register_timeout_ms": "120000", "RAY_AUTH_MODE": "disabled", **gcs_env})
    subprocess.check_call(cmd, env=env, stdout=subprocess.DEVNULL)
    return temp_dir


def run_head_restart(opts: argparse.Namespace) -> dict[str, Any]:
    """GCS fault tolerance on Redis; the whole head (GCS, raylet, proxy, ingress, Serve
    controller, job actor, autoscaler) SIGKILLed while a job runs and clients send
    requests, then started again: what the clients saw, what the job recorded, and whether
    the model replica on the worker node lived through it."""
    import httpx
    import psutil
    import ray
    from ray import serve

    from serve_app.config import APP_NAME
    from serve_app.deployments.app import build_app

    data = Path(tempfile.mkdtemp(prefix="pe-head-restart-"))
    folder = data / "jobs" / "inputs" / "head-restart"
    folder.mkdir(parents=True)
    for i in range(opts.items):
        (folder / f"h{i:03d}.png").write_bytes(png_bytes(4000 + i))
    cluster = cluster_class()(
        head_resources={"CPU": HEAD_CPUS}, worker_node_types=worker_node_types(opts.max_workers),
        max_workers=opts.max_workers, idle_timeout_minutes=opts.idle_timeout_min,
    )
    cluster.later_heads = []
    report: dict[str, Any] = {"items": opts.items, "clients": opts.clients}
    with redis_server(data) as redis, contextlib.ExitStack() as stack:
        gcs_env = {"RAY_REDIS_ADDRESS": redis,
                   "RAY_external_storage_namespace": f"pe-{os.getpid()}-{time.time_ns()}"}
        stack.callback(cluster.shutdown)
        cluster.start(override_env=gcs_env)
        assert cluster.temp_dir is not None
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": opts.port})
        args = app_args(1, data)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{opts.port}"
        wait_ready(url, opts.ready_timeout_s, every_s=2)
        [replica] = [a for a in model_replicas() if a["state"] == "ALIVE"]
        worker_node = replica["node_id"]
        report["placement"] = {"model_replica_node": worker_node,
                               "job_actor_node": _actor_node("JobManager"),
                               "ingress_node": _actor_node("Ingress")}
        ingress = args["ingress"]
        clients = Clients(url, opts.clients, ingress["queue_timeout_s"] + ingress["request_timeout_s"] + 30,
                          retry_refused=True)
        clients.start()
        r = httpx.post(f"{url}/v1/jobs", timeout=60, json={
            "input_prefix": str(folder), "max_inflight": 2, "options": {"face": False, "upscale": 1}})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        t_end = time.time() + opts.ready_timeout_s
        while httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()["done"] < opts.kill_after_items:
            if time.time() > t_end:
                raise TimeoutError("the job did not get going")
            time.sleep(0.2)
        ray.shutdown()  # this driver's connection would not outlive its GCS for long
        head = head_processes(cluster.temp_dir)
        report["killed"] = sorted({p.name() for p in head})
        t_kill = time.time()
        for proc in head:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(p) for p in head):
            time.sleep(0.05)
        restart_head(cluster, gcs_env)
        report["ray_start_returned_s"] = round(time.time() - t_kill, 1)
        ray.init(address=cluster.address, log_to_driver=False)
        while True:
            snap = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json() if _answers(url) else {}
            if snap.get("state") in ("completed", "partial", "failed", "cancelled"):
                break
            if time.time() - t_kill > opts.recover_timeout_s:
                report["timed_out"] = True
                break
            time.sleep(1)
        report["job_end_s"] = round(time.time() - t_kill, 1)
        time.sleep(2)
        clients.join()
        ok = [a["t"] + a["seconds"] - t_kill for a in clients.attempts
              if a["status"] == 200 and a["t"] + a["seconds"] > t_kill + report["ray_start_returned_s"]]
        report["first_200_after_kill_s"] = round(min(ok), 1) if ok else None
        report["job"] = snap
        manifest = data / "jobs" / "jobs" / job_id / "manifest.jsonl"
        records = [json.loads(x) for x in manifest.read_text().splitlines()]
        report["manifest"] = {
            "records": len(records), "indices": sorted(x["index"] for x in records),
            "retried": sorted(x["index"] for x in records if x.get("attempts", 1) > 1)}
        report["model_replica_kept"] = any(a["actor_id"] == replica["actor_id"]
                                           and a["state"] == "ALIVE" for a in model_replicas())
        nodes = gcs_nodes()
        report["worker_node_alive"] = nodes[worker_node]["Alive"]
        report["nodes_after"] = {i: n["Alive"] for i, n in nodes.items()}
        status = serve.status().applications[APP_NAME]
        report["serve_after"] = {"status": str(status.status.value), "replicas": {
            d: {str(k.value if hasattr(k, "value") else k): v for k, v in s.replica_states.items()}
            for d, s in status.deployments.items()}}
        report["attempts"] = [{**a, "t": round(a["t"] - t_kill, 2)} for a in clients.attempts]
        report["requests"] = [{**q, "t": round(q["t"] - t_kill, 2)} for q in clients.requests]
        report["load_after"] = os.getloadavg()
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    Path(opts.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def head_restart_summary(report: dict[str, Any]) -> dict[str, Any]:
    from collections import Counter

    keys = ("killed", "ray_start_returned_s", "first_200_after_kill_s", "job_end_s",
            "model_replica_kept", "worker_node_alive", "serve_after", "placement", "load_after")
    return {
        "requests_final": dict(Counter(str(q["final"]) for q in report["requests"])),
        "attempts_by_status": dict(Counter(str(a["status"]) for a in report["attempts"])),
        "job": {k: report["job"].get(k) for k in ("state", "done", "total")},
        "manifest": {"records": report["manifest"]["records"],
                     "retried": report["manifest"]["retried"]},
        **{k: report.get(k) for k in keys},
    }


def node_death_summary(report: dict[str, Any]) -> dict[str, Any]:
    from collections import Counter

    attempts = report["attempts"]
    statuses = Counter(str(a["status"]) + (f" {a['code']}" if a.get("code") else "")
                       for a in attempts)
    return {
        "requests": len(report["requests"]),
        "requests_final": dict(Counter(str(q["final"]) for q in report["requests"])),
        "attempts_by_status": dict(statuses),
        "requests_retried": sum(1 for q in report["requests"] if q["tries"] > 1),
        "slowest_attempt_s": round(max((a["seconds"] for a in attempts), default=0), 1),
        "events_s": report["events_s"],
        "job": {k: report["job"].get(k) for k in ("state", "done", "total", "counts")},
        "items_retried": report["manifest"]["retried"],
        "manifest_records": report["manifest"]["records"],
        "kill": report["kill"],
        "placement": report["placement"],
        "load_after": report["load_after"],
    }


def _actor_node(class_part: str) -> list[str]:
    import ray

    return sorted({info["Address"]["NodeID"] for info in ray._private.state.actors().values()
                   if class_part in (info.get("ActorClassName") or "")
                   and info["State"] == "ALIVE"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--yes", action="store_true", help="accepted for old command lines; no longer needed")
    p.add_argument("--max-workers", type=int, default=2)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--idle-timeout-min", type=float, default=0.5)
    p.add_argument("--locustfile", default="interactive")
    p.add_argument("--stages", default="20:6,90:6,10:0")
    p.add_argument("--user-rate", type=float, default=2.0)
    p.add_argument("--port", type=int, default=int(os.environ.get("PE_FAKE_CLUSTER_PORT", "8765")))
    p.add_argument("--ready-timeout-s", type=float, default=300)
    p.add_argument("--tail-margin-s", type=float, default=120)
    p.add_argument("--out", default="docs/loadtest-fake-cluster")
    p.add_argument("--scale-out", default="", help="e.g. 1,2,3: the plumbing scale-out benchmark")
    p.add_argument("--case", default="512-jpeg-x2", help="scale-out: plumbing_bench case")
    p.add_argument("--concurrency", type=int, default=16, help="scale-out: connections")
    p.add_argument("--seconds", type=float, default=15, help="scale-out: window")
    p.add_argument("--repeats", type=int, default=3, help="scale-out: windows per count")
    p.add_argument("--node-death", action="store_true",
                   help="SIGKILL the model replica's node mid-job and mid-traffic")
    p.add_argument("--head-restart", action="store_true",
                   help="GCS fault tolerance on Redis: SIGKILL the whole head mid-job, start it again")
    p.add_argument("--items", type=int, default=80, help="node death: job items")
    p.add_argument("--clients", type=int, default=2, help="node death: interactive clients")
    p.add_argument("--kill-after-items", type=int, default=10, help="node death: job items done first")
    p.add_argument("--recover-timeout-s", type=float, default=600, help="node death: give up after")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # AutoscalingCluster shells out to `ray start`: use this interpreter's, not the PATH's.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if opts.scale_out:
        print(json.dumps(run_scale_out(opts)["runs"], indent=1))
        return 0
    if opts.node_death:
        print(json.dumps(node_death_summary(run_node_death(opts)), indent=1))
        return 0
    if opts.head_restart:
        print(json.dumps(head_restart_summary(run_head_restart(opts)), indent=1))
        return 0
    report = run(opts)
    keys = ("requests", "throughput_rps", "errors_by_status", "replica_events", "resource_node_events")
    print(json.dumps({k: report.get(k) for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
