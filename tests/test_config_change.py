"""A config changes under load: ``serve deploy`` of a changed config while clients send
steady traffic loses no request, and the new settings are in force afterwards (read back from
the running application, not assumed).

``serve deploy`` posts the config to the dashboard, which hands it to the Serve controller's
``apply_config``; this test calls that same controller method through Serve's client (the
session's Ray runs without the dashboard, docs/TESTING.md), so the path from the config to
the replicas is the one ``serve deploy`` and KubeRay's in-place upgrades take. The application
is its own (``photoenhance-upgrade`` at ``/upgrade``), declared beside the session's dev app,
which a declarative deploy leaves alone (it only deletes other declared applications).

What changes in one deploy, as an operator's upgrade would:
- ``batching.max_batch_size`` 4 -> 2 and ``limits.max_bytes`` (new constructor arguments, so
  Serve replaces the replicas, one at a time);
- the code version: a changed ``runtime_env`` is what a new image or ``working_dir`` gives, and
  Serve rebuilds the application and rolls every replica onto it;
- a model added to the weights folder before the deploy is served by name afterwards.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._added_models import write_state

pytestmark = pytest.mark.slow

APP = "photoenhance-upgrade"
PREFIX = "/upgrade"
CLIENTS = 4
SETTLE_S = 240.0  # a rolling replacement of two deployments on a busy 2-core machine


def _config(args: dict[str, Any], env: dict[str, str], version: str) -> dict[str, Any]:
    return {"applications": [{
        "name": APP,
        "route_prefix": PREFIX,
        "import_path": "serve_app.deployments.app:build_app",
        "args": args,
        "runtime_env": {"env_vars": {**env, "PHOTOENHANCE_CODE_VERSION": version}},
    }]}


def _deploy(config: dict[str, Any]) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def _app_status() -> str:
    from ray import serve

    app = serve.status().applications.get(APP)
    return str(app.status) if app else "MISSING"


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what} ({_app_status()})"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def upgrade(serve_url: str, serve_args: dict[str, Any], object_stores: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve

    from tests.conftest import ROOT

    tmp = tmp_path_factory.mktemp("upgrade")
    args = copy.deepcopy(serve_args)
    args["name"] = APP
    args["jobs"] = {**args["jobs"], "data_dir": str(tmp / "jobs")}
    args["weights"] = {**args["weights"], "added": str(tmp / "added")}
    env = {"PYTHONPATH": str(ROOT), **object_stores}
    _deploy(_config(args, env, "1"))
    _wait(lambda: _app_status().endswith("RUNNING"), SETTLE_S, "the first version")
    try:
        yield {"url": serve_url + PREFIX, "args": args, "env": env, "tmp": tmp}
    finally:
        serve.delete(APP)


def _keep_serve_logs() -> None:
    """Copy Serve's logs where a failed run can be read (the session's Ray folder goes)."""
    import shutil

    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    shutil.copytree(logs, "/tmp/pe-upgrade-serve-logs", dirs_exist_ok=True)
    print("Serve's logs kept in /tmp/pe-upgrade-serve-logs")


def _load(url: str, body: bytes, stop: threading.Event, codes: Counter, slowest: list[float]) -> None:
    with httpx.Client(timeout=180.0) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = client.post(f"{url}/v1/enhance?upscale=2&face=false", content=body,
                                headers={"Content-Type": "image/png"})
                codes[r.status_code] += 1
            except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                codes[type(exc).__name__] += 1
            slowest.append(time.monotonic() - started)


def test_serve_deploy_of_a_changed_config_under_load_fails_nothing(upgrade: dict[str, Any], images: Any) -> None:
    url, args = upgrade["url"], upgrade["args"]
    http = httpx.Client(base_url=url, timeout=60.0)
    before = http.get("/v1/models").json()
    assert before["engine"]["max_batch_size"] == 4
    assert before["limits"]["max_bytes"] == args["limits"]["max_bytes"]
    assert not before["models"].get("added")

    # A model added by the operator before the upgrade (as `photoenhance models add` would).
    from serve_app.engine.added import add

    src = upgrade["tmp"] / "src"
    src.mkdir()
    add([write_state("ESRGAN", src)], args["weights"]["added"], name="esrgan-upgrade")

    body = images.cv2_bytes(images.array(64, 64))
    stop, codes, times = threading.Event(), Counter(), []
    clients = [threading.Thread(target=_load, args=(url, body, stop, codes, times), daemon=True)
               for _ in range(CLIENTS)]
    for c in clients:
        c.start()
    try:
        _wait(lambda: sum(codes.values()) >= 2 * CLIENTS, 120.0, "the load to flow")
        new = copy.deepcopy(args)
        new["batching"] = {**new["batching"], "max_batch_size": 2}
        new["limits"] = {**new["limits"], "max_bytes": 8 * 1024 * 1024}
        deployed_at = time.monotonic()
        _deploy(_config(new, upgrade["env"], "2"))

        def upgraded() -> bool:
            r = http.get("/v1/models")
            codes[f"models {r.status_code}"] += 1
            if r.status_code != 200:
                return False
            info = r.json()
            return (_app_status().endswith("RUNNING")
                    and info["engine"]["max_batch_size"] == 2
                    and info["engine"]["started_at"] != before["engine"]["started_at"])

        _wait(upgraded, SETTLE_S, "the new version")
        upgraded_after_s = time.monotonic() - deployed_at
        served_before_settle = sum(codes.values())
        # Steady load goes on against the new version for a while before it is judged.
        _wait(lambda: sum(codes.values()) >= served_before_settle + 2 * CLIENTS, 120.0,
              "requests on the new version")
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=200)

    print(f"config change under load: {dict(codes)}, new version in force after "
          f"{upgraded_after_s:.1f} s, slowest request {max(times):.1f} s")
    if set(codes) - {200, "models 200"}:
        _keep_serve_logs()
    assert set(codes) <= {200, "models 200"}, dict(codes)

    # Read back: every new setting is in force.
    after = http.get("/v1/models").json()
    assert after["engine"]["max_batch_size"] == 2
    assert after["limits"]["max_bytes"] == 8 * 1024 * 1024
    assert "esrgan-upgrade" in {m["name"] for m in after["models"]["added"]}
    # The new byte limit is enforced, not only reported.
    too_big = http.post("/v1/enhance", content=b"\x89PNG" + b"\0" * (8 * 1024 * 1024 + 1),
                        headers={"Content-Type": "image/png"})
    assert too_big.status_code == 413, too_big.text
    # The added model serves by name after the upgrade.
    r = http.post("/v1/enhance?bg_model=esrgan-upgrade&face=false&upscale=2", content=body,
                  headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    http.close()
