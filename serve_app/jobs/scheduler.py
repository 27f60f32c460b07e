"""Dispatching the items of every job: bounded, prioritised, retried, recorded.

One loop fills free slots: at most ``max_inflight`` items in flight across all jobs and
``max_inflight_per_job`` within a job, taking from the highest-priority active job first
(least recently served among equals). Bounding job traffic is what keeps interactive
requests ahead of it: a job never has more than its slots queued at the model.

Each item runs as one task, ``item.ItemRunner.run`` (fetch, enhance, retries, its output and
record); this module holds the jobs' life around it: submission and quotas, the dispatch
loop, pauses, cancels, expiry, recovery, listing and callbacks.

The same class runs inside the job actor and in ``runner.run_job`` (``python -m
serve_app.cli.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from serve_app.config import JobsConfig
from serve_app.jobs import webhooks
from serve_app.jobs.gate import Gate, Location, protocol_of
from serve_app.jobs.item import Dispatch, ItemRunner
from serve_app.jobs.job import Job
from serve_app.jobs.listing import list_prefix
from serve_app.jobs.manifest import MANIFEST
from serve_app.jobs.quota import Quota, check_output_free, check_quota
from serve_app.jobs.spec import ACTIVE, JOB_JSON, TERMINAL, JobSpec

LOGGER = logging.getLogger(__name__)

TICK_S = 0.5
SPACE_CHECK_S = 1.0
EXPIRE_EVERY_S = 60.0


class Scheduler:
    def __init__(
        self,
        config: JobsConfig,
        dispatch: Dispatch,
        *,
        max_bytes: int,
        timeout_s: float,
        gate: Gate | None = None,
    ) -> None:
        self.config = config
        self.dispatch = dispatch
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.gate = gate  # None: a trusted runner (a Ray job) that may read anything
        self.jobs: dict[str, Job] = {}
        self._claims: dict[str, tuple[Location, JobSpec]] = {}  # jobs being created
        self.items = ItemRunner(self)
        self.inflight = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._listers: dict[str, asyncio.Task[None]] = {}
        self._space_checked: dict[str, float] = {}
        self._expired_at = 0.0
        self._stopping = False
        self._expiry: asyncio.Task[Any] | None = None
        self._callbacks: set[asyncio.Task[Any]] = set()  # callbacks, expiry
        self._sending: set[str] = set()

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        # The flag as well as the cancel: in Python 3.11 asyncio.wait_for can swallow a
        # cancel that lands as its wait ends, and a loop left running would dispatch (and
        # take the manifest's lock) after stop.
        self._stopping = True
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in [*self._callbacks, *self._listers.values()]:
            task.cancel()
        if self._listers:
            await asyncio.gather(*self._listers.values(), return_exceptions=True)
        for job in self.jobs.values():
            for task in list(job.tasks):
                task.cancel()
        for job in self.jobs.values():
            if job.tasks:
                await asyncio.gather(*job.tasks, return_exceptions=True)
            job.close()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ jobs

    async def submit(self, spec: JobSpec, folder: Path, quota: Quota | None = None) -> Job:
        """Create and start the job. The quota and output checks and the claim run with no
        await between them, so concurrent submissions (from any ingress replica: they all
        call this one actor) cannot both pass a check that only one of them fits."""
        if spec.job_id in self.jobs:  # a retried submission: the job exists already
            return self.jobs[spec.job_id]
        if quota is not None and spec.owner is not None:
            check_quota(spec, quota, self._live_specs(), self.jobs)
        output = Location(protocol_of(spec.output), spec.output)  # type: ignore[arg-type]
        self._claim(spec, output)

        def create() -> Job:
            job = Job.create(spec, folder)
            job.storage.prepare()
            return job

        try:
            job = await asyncio.to_thread(create)
            self._add(job)
        finally:
            self._claims.pop(spec.job_id, None)
        return job

    def _live_specs(self) -> list[JobSpec]:
        """Jobs not ended, and jobs being created."""
        return [*(spec for _, spec in self._claims.values()),
                *(j.spec for j in self.jobs.values() if j.state not in TERMINAL)]

    def _claim(self, spec: JobSpec, output: Location) -> None:
        check_output_free(output, self._live_specs())
        self._claims[spec.job_id] = (output, spec)

    async def delete(self, job_id: str) -> None:
        """Cancel the job if it runs, wait for its items in flight, forget it and remove
        its folder (outputs elsewhere stay)."""
        job = self.get(job_id)
        if job.state not in TERMINAL:
            self.control(job_id, "cancel")
        if job.tasks:
            await asyncio.gather(*job.tasks, return_exceptions=True)
        job.close()
        self.jobs.pop(job_id, None)
        self._space_checked.pop(job_id, None)
        self.items.forget(job_id)
        await asyncio.to_thread(shutil.rmtree, job.folder, True)
        LOGGER.info("job %s deleted", job_id)

    async def expire(self, now: float | None = None) -> list[str]:
        """Cancel jobs paused longer than ``paused_ttl_s`` (``paused_expired``), delete ended
        jobs older than ``retention_s``; returns the ids deleted."""
        now = time.time() if now is None else now
        ttl = self.config.paused_ttl_s
        if ttl is not None:
            for job in list(self.jobs.values()):
                if job.state == "paused" and (job.paused_at or job.updated_at) + ttl < now:
                    LOGGER.warning("job %s: paused for over %gs, cancelled", job.id, ttl)
                    self._cancel(job, "paused_expired")
        retention = self.config.retention_s
        if retention is None:
            return []
        old = [j.id for j in self.jobs.values()
               if j.state in TERMINAL and (j.finished_at or j.updated_at) + retention < now]
        for job_id in old:
            if job_id in self.jobs:  # not deleted meanwhile by a client
                await self.delete(job_id)
        return old

    def recover(self, jobs_dir: Path) -> list[str]:
        """Read back every job folder; unfinished jobs continue. Returns their ids."""
        resumed = []
        if not jobs_dir.is_dir():
            return resumed
        for folder in sorted(jobs_dir.iterdir()):
            if folder.name in self.jobs or not (folder / JOB_JSON).is_file():
                continue
            try:
                job = self.adopt(folder)
            except Exception:
                LOGGER.exception("cannot read job folder %s", folder)
                continue
            if job.state not in TERMINAL:
                resumed.append(job.id)
        return resumed

    def adopt(self, folder: Path) -> Job:
        """Read one job folder back; an unfinished job continues where its manifest ends."""
        job = Job.open(folder)
        if job.state not in TERMINAL:
            job.storage.prepare()
            job.storage.remove_temporaries()
        self._add(job)
        return job

    def _add(self, job: Job) -> None:
        self.jobs[job.id] = job
        job.on_end = self._notify
        if job.state in TERMINAL:
            self._notify(job)  # a callback still pending when the last actor stopped
            return
        if not job.listed:
            self._listers[job.id] = asyncio.get_running_loop().create_task(self._list(job))
        self._maybe_finish(job)
        self.wake()

    def get(self, job_id: str) -> Job:
        from serve_app.errors import NotFound

        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        return job

    def control(self, job_id: str, action: str) -> Job:
        job = self.get(job_id)
        if action == "resume":
            job.storage.check_space(0, self.config.min_free_bytes)
        if action == "cancel":
            job.control(action)
            self._cancel(job)
        else:
            job.control(action)
            if action == "resume":
                self._maybe_finish(job)
        self.wake()
        return job

    def _cancel(self, job: Job, reason: str | None = None) -> None:
        """Cancel (the job is already cancelled when ``reason`` is None: a client's cancel)."""
        if reason is not None:
            job.set_state("cancelled", reason)
        self._abandon(job)
        self._settle(job)
        self.wake()

    def _abandon(self, job: Job) -> None:
        for task in list(job.tasks):
            task.cancel()
        lister = self._listers.pop(job.id, None)
        if lister:
            lister.cancel()

    def _notify(self, job: Job) -> None:
        """Deliver the job's callback, once, in the background."""
        record = job.callback
        if record is None or record.get("state") != "pending" or job.id in self._sending:
            return
        self._sending.add(job.id)

        async def send() -> None:
            try:
                secret = webhooks.secret_for(self.config, job.spec.owner)
                await webhooks.deliver(job.spec.callback_url or "", webhooks.summary(
                    job.snapshot()), secret=secret, gate=self.gate, config=self.config,
                    record=record)
            except Exception as exc:
                LOGGER.warning("job %s: callback not sent: %r", job.id, exc)
                record["state"] = "failed"
            finally:
                self._sending.discard(job.id)
            LOGGER.info("job %s: callback %s after %d attempt(s)", job.id, record["state"],
                        record.get("attempts", 0))
            if self.jobs.get(job.id) is job:  # not deleted meanwhile
                job.touch()
                await asyncio.to_thread(job.save_state)

        self._background(send())

    def _background(self, work: Any) -> asyncio.Task[Any]:
        """Run ``work`` as a task that ``stop`` cancels; its failures are logged."""

        def done(task: asyncio.Task[Any]) -> None:
            self._callbacks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                LOGGER.error("job background task failed", exc_info=task.exception())

        task = asyncio.get_running_loop().create_task(work)
        self._callbacks.add(task)
        task.add_done_callback(done)
        return task

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self._fill()
                expiring = self._expiry is not None and not self._expiry.done()
                if time.monotonic() - self._expired_at > self._expire_every() and not expiring:
                    # In the background: removing large folders must not hold up dispatch.
                    self._expired_at = time.monotonic()
                    self._expiry = self._background(self.expire())
            except Exception:
                LOGGER.exception("job scheduler pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    def _expire_every(self) -> float:
        """Every minute, or more often when a limit is shorter (each checked within half
        of it)."""
        limits = [t for t in (self.config.retention_s, self.config.paused_ttl_s) if t]
        return max(TICK_S, min([EXPIRE_EVERY_S, *(t / 2 for t in limits)]))

    def _fill(self) -> None:
        per_job = self.config.max_inflight_per_job
        while self.inflight < self.config.max_inflight and not self._stopping:
            candidates = [
                j for j in self.jobs.values()
                if j.state in ACTIVE and j.inflight < min(j.limit, per_job) and j.has_pending()
            ]
            if not candidates:
                return
            job = max(candidates, key=lambda j: (j.spec.priority, -j.last_dispatch))
            if not self._space_ok(job):
                continue
            index = job.take()
            if index is None:
                continue
            if job.state == "queued":
                job.set_state("running")
            self.inflight += 1
            task = asyncio.get_running_loop().create_task(self.items.run(job, index))
            job.tasks.add(task)
            task.add_done_callback(functools.partial(self._item_done, job, index))

    def _item_done(self, job: Job, index: int, task: asyncio.Task[Any]) -> None:
        """A cancelled item gives its slot back here, not in ``ItemRunner.run``: a task
        cancelled before its first step never runs its body, so no handler inside it would."""
        job.tasks.discard(task)
        if task.cancelled():
            self.give_back(job, index)

    def give_back(self, job: Job, index: int, pause_reason: str | None = None) -> None:
        """The item goes back to pending and its slot is free; with ``pause_reason`` (a fault
        that is not the item's own) the job pauses rather than spin on it: resume retries."""
        job.release(index)
        self.inflight -= 1
        if pause_reason and job.state in ACTIVE:
            job.set_state("paused", pause_reason)
        self._settle(job)
        self.wake()

    def _space_ok(self, job: Job) -> bool:
        """Pause the job (with a reason) when its storage falls under the floor."""
        floor = self.config.min_free_bytes
        now = time.monotonic()
        if floor <= 0 or now - self._space_checked.get(job.id, 0.0) < SPACE_CHECK_S:
            return True
        self._space_checked[job.id] = now
        free = job.storage.free_bytes()
        if free is None or free >= floor:
            return True
        job.set_state("paused", "low_disk")
        LOGGER.warning("job %s paused: %d bytes free, under the floor of %d", job.id, free, floor)
        return False

    def _settle(self, job: Job) -> None:
        """An ended job whose last item is done keeps no writer (its fd and lock) open."""
        if job.state in TERMINAL and job.inflight == 0:
            job.close()

    def finished(self, job: Job) -> None:
        """An item is recorded (``Job.finish`` done): its slot is free."""
        self.inflight -= 1
        self._maybe_finish(job)
        self._settle(job)
        self.wake()

    def _maybe_finish(self, job: Job) -> None:
        if job.state in ACTIVE and job.is_complete():
            state = job.final_state()
            reason = "no_inputs" if job.total == 0 else None
            job.set_state(state, reason)
            job.close()
            _copy_records(job)

    # ------------------------------------------------------------------ listing

    async def _list(self, job: Job) -> None:
        try:
            listed = await list_prefix(job, self.wake)
        finally:
            self._listers.pop(job.id, None)
        if listed:
            self._maybe_finish(job)
            self.wake()


def _copy_records(job: Job) -> None:
    """For remote outputs, put the manifest and spec beside them once the job ends."""
    if job.storage.local:
        return
    try:
        for name in (MANIFEST, JOB_JSON):
            path = job.folder / name
            if path.exists():
                job.storage.upload(path, name)
    except Exception:
        LOGGER.exception("job %s: copying the manifest to %s failed", job.id, job.spec.output)
