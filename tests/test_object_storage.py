"""Jobs on object storage, against real protocol servers on loopback: moto's S3 server
(spoken to by s3fs over HTTP) and fake-gcs-server (gcsfs over its JSON API), both started by
the ``object_stores`` session fixture before Ray, so the job actor and the ingress reach
them through the same settings a deployment would use (``FSSPEC_S3``/``AWS_*``,
``STORAGE_EMULATOR_HOST``).

A job reads a prefix of one bucket and writes its outputs and manifest to another, its
actor is killed half-way, and the item and ZIP routes serve the outputs from the bucket.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import uuid
import zipfile
from typing import Any

import fsspec
import httpx
import pytest
from conftest import job_ended, noise_png, wait_job
from test_jobs_api import _manager, assert_exactly_once, manifest, submit

from serve_app.config import AppConfig

ITEMS = 24


def bucket_fs(scheme: str, object_stores: dict[str, str]) -> Any:
    options = json.loads(object_stores[f"FSSPEC_{scheme.upper()}"])
    return fsspec.filesystem(scheme, skip_instance_cache=True, **options)


def make_bucket(fs: Any, name: str) -> None:
    if not fs.exists(name):
        fs.mkdir(name)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_bucket_prefix_job_survives_an_actor_kill_and_serves_from_the_bucket(
    http: httpx.Client, app_config: AppConfig, object_stores: dict[str, str], scheme: str
) -> None:
    import ray

    fs = bucket_fs(scheme, object_stores)
    source, target = f"pe-in-{scheme}", f"pe-out-{scheme}"
    run = f"run-{uuid.uuid4().hex[:8]}"  # a fresh output prefix: the test may run again
    for bucket in (source, target):
        make_bucket(fs, bucket)
    for i in range(ITEMS):
        fs.pipe_file(f"{source}/shoot/img{i:03d}.png", noise_png(500 + i, 32))
    fs.pipe_file(f"{source}/shoot/notes.txt", b"not an image: not listed")

    job = submit(
        http, input_prefix=f"{scheme}://{source}/shoot/", output=f"{scheme}://{target}/{run}",
        max_inflight=1, options={"face": False, "upscale": 1},
    )
    job_id = job["job_id"]
    wait_job(http, job_id, lambda s: s["done"] >= 3, timeout=180)
    pid = ray.get(_manager(app_config).pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)  # Ray restarts the actor; the job resumes from its manifest
    snap = wait_job(http, job_id, job_ended, timeout=300)
    assert snap["state"] == "completed", snap
    assert snap["counts"]["succeeded"] == ITEMS and snap["total"] == ITEMS
    assert ray.get(_manager(app_config).pid.remote(), timeout=30) != pid

    records = manifest(http, job_id)
    assert_exactly_once(records, ITEMS)
    assert all(r["source"].startswith(f"{scheme}://{source}/shoot/img") for r in records)

    # Outputs, the manifest and the job's spec are in the output bucket.
    stored = {p.rsplit("/", 1)[1] for p in fs.ls(f"{target}/{run}", detail=False)}
    outputs = stored - {"manifest.jsonl", "job.json"}
    assert {"manifest.jsonl", "job.json"} <= stored and len(outputs) == ITEMS, stored
    in_bucket = [json.loads(x) for x in fs.cat(f"{target}/{run}/manifest.jsonl").splitlines()]
    assert sorted(r["index"] for r in in_bucket) == list(range(ITEMS))
    digests = {hashlib.sha256(fs.cat(f"{target}/{run}/{name}")).hexdigest() for name in outputs}
    assert digests == {r["sha256"] for r in records}

    # One item, and the ZIP, are streamed from the bucket by the ingress.
    record = records[5]
    one = http.get(f"/v1/jobs/{job_id}/items/{record['index']}/result")
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    assert hashlib.sha256(one.content).hexdigest() == record["sha256"]
    z = http.get(f"/v1/jobs/{job_id}/results.zip")
    assert z.status_code == 200
    with zipfile.ZipFile(io.BytesIO(z.content)) as archive:
        members = archive.namelist()
        assert len(members) == ITEMS
        assert {hashlib.sha256(archive.read(m)).hexdigest() for m in members} == digests


def test_only_allowed_buckets_are_read_and_written(
    http: httpx.Client, object_stores: dict[str, str]
) -> None:
    """``jobs.storage.input_buckets`` / ``output_buckets`` (conftest allows ``pe-in-*`` for
    reading and ``pe-out-*`` for writing): anything else is refused before a job exists."""
    fs = bucket_fs("s3", object_stores)
    make_bucket(fs, "pe-elsewhere")
    fs.pipe_file("pe-elsewhere/a.png", noise_png(901, 32))
    cases = [
        {"input_prefix": "s3://pe-elsewhere/"},
        {"inputs": ["s3://pe-elsewhere/a.png"]},
        {"input_prefix": "gs://pe-out-gs/"},  # writable, not readable
        {"inputs": ["s3://pe-in-s3/a.png"], "output": "s3://pe-in-s3/out"},  # readable only
        {"inputs": ["s3://pe-in-s3/a.png"], "output": "gs://pe-elsewhere/out"},
    ]
    for body in cases:
        r = http.post("/v1/jobs", json={**body, "options": {"face": False}})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["code"] == "forbidden_path", (body, r.text)
        assert "pe-" not in r.json()["error"]["message"]  # no storage names echoed back


def test_a_missing_bucket_object_fails_its_item_only(
    http: httpx.Client, object_stores: dict[str, str]
) -> None:
    fs = bucket_fs("s3", object_stores)
    make_bucket(fs, "pe-in-s3")
    fs.pipe_file("pe-in-s3/mixed/a.png", noise_png(900, 32))
    inputs = ["s3://pe-in-s3/mixed/a.png", "s3://pe-in-s3/mixed/gone.png"]
    job = submit(http, inputs=inputs, options={"face": False, "upscale": 1})
    snap = wait_job(http, job["job_id"], job_ended, timeout=180)
    assert snap["state"] == "partial"
    assert snap["counts"]["succeeded"] == 1 and snap["counts"]["failed"] == 1
    failed = http.get(f"/v1/jobs/{job['job_id']}/items", params={"status": "failed"}).json()
    assert [(i["source"], i["error"]["code"]) for i in failed["items"]] == [
        ("s3://pe-in-s3/mixed/gone.png", "source_not_found")
    ]
