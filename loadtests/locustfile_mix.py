"""Both kinds of traffic at once: EnhanceUser and JobUser in the ratio of their weights (4:1).

    locust -f loadtests/locustfile_mix.py --headless -H http://127.0.0.1:8000 -u 10 -r 2 -t 3m
"""

from __future__ import annotations

from locustfile_interactive import EnhanceUser
from locustfile_jobs import JobUser
from pe_common import stages_shape

__all__ = ["EnhanceUser", "JobUser"]
Shape = stages_shape()
