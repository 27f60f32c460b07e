"""What the Locust files share: settings from the environment, generated images, the
ramp shape, and one way to record a response (failures named by their HTTP status).

Settings (environment variables, so that ``locust`` and ``run_scenario.py`` pass them alike):

    PE_IMAGE_SIZE   "96x64"    width x height of the generated images
    PE_OPTIONS      ""         query string added to /v1/enhance and job options, e.g. "upscale=2"
    PE_USER_RATE    "1"        requests per second per simulated user (constant throughput)
    PE_JOB_FILES    "8"        images per job
    PE_JOB_WAIT     "1"        1: follow each job to its end and record its duration
    PE_STAGES       ""         ramp shape, "30:8,60:8,30:0" = (seconds:users at its end),...;
                               empty: Locust's own -u/-r/-t apply
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from locust import LoadTestShape
from pe_data import parse_stages, png, stage_tick


@dataclass(frozen=True)
class Settings:
    width: int
    height: int
    options: dict[str, str]
    user_rate: float
    job_files: int
    job_wait: bool

    @classmethod
    def from_env(cls) -> Settings:
        w, _, h = os.environ.get("PE_IMAGE_SIZE", "96x64").lower().partition("x")
        return cls(
            width=int(w),
            height=int(h or w),
            options=dict(parse_qsl(os.environ.get("PE_OPTIONS", ""))),
            user_rate=float(os.environ.get("PE_USER_RATE", "1")),
            job_files=int(os.environ.get("PE_JOB_FILES", "8")),
            job_wait=os.environ.get("PE_JOB_WAIT", "1") == "1",
        )


def images(settings: Settings, count: int = 8) -> list[bytes]:
    """A few distinct images (different bytes, same size), made once per process."""
    return [png(settings.width, settings.height, seed) for seed in range(count)]


def record(response: Any, route: str) -> bool:
    """Mark a ``catch_response`` response: a 2xx keeps the route's name; anything else is a
    failure reported under ``"<route> [HTTP <status>]"``, so the statistics keep success
    latencies apart and count errors by status (0: no response at all)."""
    status = int(response.status_code or 0)
    if 200 <= status < 300:
        response.success()
        return True
    response.request_meta["name"] = f"{route} [HTTP {status}]"
    response.failure(f"HTTP {status}")
    return False


def post_enhance(client: Any, image: bytes, options: dict[str, str]) -> Any:
    """One ``POST /v1/enhance`` of a PNG, recorded (see ``record``); returns the response."""
    with client.post(
        "/v1/enhance",
        params=options,
        data=image,
        headers={"Content-Type": "image/png"},
        name="/v1/enhance",
        catch_response=True,
    ) as response:
        record(response, "/v1/enhance")
    return response


# ------------------------------------------------------------------ ramp shape


class StagesShape(LoadTestShape):
    """Linear ramps between user counts: each stage reaches its count at its end."""

    abstract = True
    stages: list[tuple[float, int]] = []

    def tick(self) -> tuple[int, float] | None:
        return stage_tick(self.stages, self.get_run_time())


def stages_shape() -> type[StagesShape] | None:
    """The shape class for ``PE_STAGES``, or None (Locust's -u/-r/-t then apply).

    A locustfile assigns it to a module name; Locust uses any shape class it finds there."""
    text = os.environ.get("PE_STAGES", "")
    if not text:
        return None
    return type("Stages", (StagesShape,), {"abstract": False, "stages": parse_stages(text)})
