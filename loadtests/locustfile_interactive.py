"""Interactive traffic: one small generated image per ``POST /v1/enhance``.

    locust -f loadtests/locustfile_interactive.py --headless -H http://127.0.0.1:8000 \
        -u 8 -r 2 -t 2m            # or PE_STAGES="30:8,60:8,30:0" for a ramp
See ``pe_common.py`` for the PE_* settings.
"""

from __future__ import annotations

import itertools

from locust import HttpUser, constant_throughput, task
from pe_common import Settings, images, post_enhance, stages_shape

SETTINGS = Settings.from_env()
IMAGES = images(SETTINGS)
Shape = stages_shape()


class EnhanceUser(HttpUser):
    """One app backend: an image in, the enhanced image out."""

    wait_time = constant_throughput(SETTINGS.user_rate)
    weight = 4

    def on_start(self) -> None:
        self._images = itertools.cycle(IMAGES)

    @task
    def enhance(self) -> None:
        post_enhance(self.client, next(self._images), SETTINGS.options)
