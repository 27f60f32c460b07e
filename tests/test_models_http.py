"""Added models over HTTP: added to the session app's weights folder (a running replica picks
them up on its next look at the registry), listed in GET /v1/models, served by name, and
refused with a clear 422 where they cannot run."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from conftest import job_ended, wait_job

from serve_app.engine import added, catalog

try:
    from _added_models import FAMILIES, SLOW, model_name, write_state
except ImportError:
    from tests._added_models import FAMILIES, SLOW, model_name, write_state

ARCHS = sorted(set(FAMILIES) - SLOW)


@pytest.fixture(scope="module")
def served(serve_args, tmp_path_factory, http):
    location = serve_args["weights"]["dir"]  # weights.added unset: the weights folder
    src = tmp_path_factory.mktemp("sources")
    facts = {}
    for arch in ARCHS:
        rec = added.add([write_state(arch, src)], location, model_name(arch), replace=True)
        facts[rec.name] = rec
    deadline = time.monotonic() + 120
    while True:  # replicas re-read the registry every few seconds; the ingress caches 2 s
        body = http.get("/v1/models").json()
        listed = {m["name"] for m in body["models"]["added"]}
        if set(facts) <= listed:
            return facts, body
        assert time.monotonic() < deadline, f"added models not listed: {set(facts) - listed}"
        time.sleep(1)


def _png(h: int, w: int, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def test_listed_with_their_facts(served):
    facts, body = served
    rows = {m["name"]: m for m in body["models"]["added"]}
    for name, rec in facts.items():
        row = rows[name]
        assert (row["arch"], row["kind"], row["scale"], row["sha256"]) == (
            rec.arch, rec.kind, rec.scale, rec.sha256)
        assert "file" not in row and "files" not in row["source"]
        group = "face" if rec.kind == "face" else "background"
        assert name in body["models"][group]


@pytest.mark.parametrize("arch", ARCHS)
def test_served_by_name(served, http, arch):
    rec = served[0][model_name(arch)]
    if rec.kind == "face":
        params = {"face": "true", "aligned": "true", "upscale": "1", "face_model": rec.name,
                  "format": "png"}
        data, want = _png(512, 512), (512, 512)
    else:
        params = {"face": "false", "bg_model": rec.name, "upscale": str(rec.scale),
                  "format": "png"}
        data, want = _png(20, 24), (20 * rec.scale, 24 * rec.scale)
    r = http.post("/v1/enhance", params=params, content=data,
                  headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    out = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape[:2] == want
    # Only the added model ran (an aligned face skips detection and the background): the
    # answer is not marked synthetic although the built-in weights are.
    assert "x-weights-synthetic" not in r.headers and "warning" not in r.headers


@pytest.mark.parametrize(
    "params, code",
    [
        ({"face": "false", "bg_model": "never-added"}, "unknown_model"),
        ({"face": "true", "face_model": "never-added", "bg_model": "none"}, "unknown_model"),
        ({"face": "true", "face_model": model_name("ESRGAN"), "bg_model": "none"},
         "wrong_model_kind"),
        ({"face": "false", "bg_model": model_name("RestoreFormer")}, "wrong_model_kind"),
        ({"face": "false", "bg_model": "../../etc/passwd"}, "invalid_option"),
        ({"face": "false", "bg_model": model_name("ESRGAN"), "denoise": "0.5"},
         "invalid_option"),
        ({"face": "false", "bg_model": "realesr-general-x4v3", "denoise": "2"},
         "invalid_option"),
    ],
)
def test_refused_with_a_clear_422(served, http, serve_args, params, code):
    r = http.post("/v1/enhance", params=params, content=_png(16, 16),
                  headers={"Content-Type": "image/png"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert serve_args["weights"]["dir"] not in r.text  # no server paths in answers


@pytest.mark.parametrize(
    "options, code",
    [
        ({"face": "false", "bg_model": "never-added"}, "unknown_model"),
        ({"face": "true", "face_model": model_name("ESRGAN"), "bg_model": "none"},
         "wrong_model_kind"),
    ],
)
def test_a_job_naming_a_model_it_cannot_run_is_refused_before_it_exists(
        served, http, data_dir, options, code):
    """Refused at submission (422), not failed item by item; nothing is left behind."""
    inputs = data_dir / "inputs" / "models"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "a.png").write_bytes(_png(16, 16))
    jobs = data_dir / "jobs"
    before = set(jobs.iterdir()) if jobs.exists() else set()
    sent = [
        http.post("/v1/jobs", json={"inputs": [str(inputs / "a.png")], "options": options}),
        http.post("/v1/jobs", files=[("files", ("a.png", _png(16, 16), "image/png"))],
                  data=options),
    ]
    for r in sent:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code
    assert (set(jobs.iterdir()) if jobs.exists() else set()) == before


def test_a_job_may_name_a_model_added_a_moment_ago(served, http, serve_args, tmp_path):
    """Not yet in the listings the ingress and the replicas last read: asked again, fresh."""
    location = serve_args["weights"]["dir"]
    rec = added.add([write_state("ESRGAN", tmp_path)], location, "t-just-added", replace=True)
    try:
        r = http.post("/v1/jobs", files=[("files", ("a.png", _png(12, 10), "image/png"))],
                      data={"face": "false", "bg_model": rec.name, "upscale": str(rec.scale),
                            "format": "png"})
        assert r.status_code == 202, r.text
        job = wait_job(http, r.json()["job_id"], job_ended)
        assert (job["state"], job["counts"]["succeeded"]) == ("completed", 1), job
    finally:
        catalog.remove(location, rec.name)


def test_denoise_answers(http):
    r = http.post("/v1/enhance", content=_png(16, 16), headers={"Content-Type": "image/png"},
                  params={"face": "false", "bg_model": "realesr-general-x4v3", "upscale": "4",
                          "denoise": "0.3", "format": "png"})
    assert r.status_code == 200, r.text
