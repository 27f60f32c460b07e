"""Batch traffic: ``POST /v1/jobs`` with a few generated images, then (PE_JOB_WAIT=1) the job
followed to its end; its duration is recorded as request type ``JOB``, name ``job done``.

    locust -f loadtests/locustfile_jobs.py --headless -H http://127.0.0.1:8000 -u 2 -r 1 -t 2m
See ``pe_common.py`` for the PE_* settings.
"""

from __future__ import annotations

import time

from locust import HttpUser, constant_throughput, task
from pe_common import Settings, images, record, stages_shape

SETTINGS = Settings.from_env()
IMAGES = images(SETTINGS, count=max(SETTINGS.job_files, 1))
TERMINAL = {"completed", "partial", "failed", "cancelled"}
POLL_S = 1.0
Shape = stages_shape()


class JobUser(HttpUser):
    """A data engineer's script: submit a folder's worth of files, wait for the job."""

    wait_time = constant_throughput(SETTINGS.user_rate / 10)
    weight = 1

    @task
    def submit_job(self) -> None:
        files = [("files", (f"load_{i:03d}.png", IMAGES[i], "image/png"))
                 for i in range(SETTINGS.job_files)]
        started = time.perf_counter()
        with self.client.post(
            "/v1/jobs", files=files, data=SETTINGS.options, name="/v1/jobs", catch_response=True
        ) as response:
            if not record(response, "/v1/jobs"):
                return
            job_id = response.json().get("job_id")
        if SETTINGS.job_wait and job_id:
            self._follow(job_id, started)

    def _follow(self, job_id: str, started: float) -> None:
        state = "unknown"
        while self.environment.runner is None or self.environment.runner.state != "stopped":
            with self.client.get(
                f"/v1/jobs/{job_id}", name="/v1/jobs/{id}", catch_response=True
            ) as response:
                if not record(response, "/v1/jobs/{id}"):
                    return
                state = response.json().get("state", "unknown")
            if state in TERMINAL:
                break
            time.sleep(POLL_S)  # gevent-patched: yields to the other users
        self.environment.events.request.fire(
            request_type="JOB",
            name=f"job {state}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=SETTINGS.job_files,
            exception=None if state == "completed" else RuntimeError(state),
            context={},
        )
