"""Overload: many app backends at once, each honouring ``Retry-After`` on a ``503``.

    .venv/bin/python loadtests/run_scenario.py --base-url http://127.0.0.1:8000 \
        --locustfile loadtests/locustfile_overload.py --stages 10:300,50:300 \
        --image-size 256x256 --options upscale=2 --lead-s 0 --tail-s 0 --out loadtests/out/overload

Each user sends one image, waits for the answer, and sends the next one a second later
(``PE_USER_RATE``), or after the server's ``Retry-After`` when it was shed. Accepted
requests are reported under ``/v1/enhance``; shed ones under ``/v1/enhance [HTTP 503]``.
"""

from __future__ import annotations

import itertools

from locust import HttpUser, task
from pe_common import Settings, images, post_enhance, stages_shape

SETTINGS = Settings.from_env()
IMAGES = images(SETTINGS)
Shape = stages_shape()


class PatientBackend(HttpUser):
    def on_start(self) -> None:
        self._images = itertools.cycle(IMAGES)
        self._pause = 1.0 / SETTINGS.user_rate

    def wait_time(self) -> float:
        return self._pause

    @task
    def enhance(self) -> None:
        response = post_enhance(self.client, next(self._images), SETTINGS.options)
        retry_after = response.headers.get("Retry-After") if response.status_code == 503 else None
        try:
            self._pause = max(float(retry_after), 1.0 / SETTINGS.user_rate) if retry_after else (
                1.0 / SETTINGS.user_rate
            )
        except ValueError:
            self._pause = 1.0 / SETTINGS.user_rate
