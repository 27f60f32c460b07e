"""What a new job may take, checked by ``Scheduler.submit`` with no await between check and
claim: a key's quota of unfinished jobs and items, and an output no live job writes to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from serve_app.errors import Conflict, TooManyRequests
from serve_app.jobs.gate import Location, protocol_of
from serve_app.jobs.job import Job
from serve_app.jobs.spec import JobSpec


@dataclass(frozen=True)
class Quota:
    """A key's limits on unfinished jobs and items (``auth.max_*_in_flight``)."""

    jobs: int
    items: int


def check_quota(spec: JobSpec, quota: Quota, live: list[JobSpec], jobs: Mapping[str, Job]) -> None:
    """429 when the key's unfinished jobs, or their unfinished items with this job's,
    would pass its limits. ``live``: the jobs not ended and those being created; a prefix
    job counts the items listed so far."""
    live = [s for s in live if s.owner == spec.owner]
    if len(live) >= quota.jobs:
        raise TooManyRequests(
            f"this key has {len(live)} unfinished jobs (the limit is {quota.jobs}); wait "
            "for one to end", code="too_many_jobs", retry_after_s=30)
    items = 0
    for other in live:
        job = jobs.get(other.job_id)
        items += (other.total or 0) if job is None else max(job.total - job.done, 0)
    new = spec.total or 0
    if items + new > quota.items:
        raise TooManyRequests(
            f"this job's {new} items and this key's {items} unfinished ones pass its "
            f"limit of {quota.items} unfinished items", code="too_many_items",
            retry_after_s=30)


def check_output_free(output: Location, live: list[JobSpec]) -> None:
    """Refuse (409) an output that a live job writes to, or inside or around one. The
    answer names no job, owner or path: with per-key output folders, another key's job
    can only be there because an admin or a handle put it there."""
    taken = [Location(protocol_of(s.output), s.output)  # type: ignore[arg-type]
             for s in live]
    if any(output.overlaps(other) for other in taken):
        raise Conflict("that output folder is in use; choose another folder or retry "
                       "later", code="output_in_use")
