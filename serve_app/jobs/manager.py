"""The job actor: one named, detached, restartable Ray actor per application.

It owns every job's state and dispatches items through the application's ``Ingress``
handle, so decoding, validation and encoding are exactly those of ``POST /v1/enhance``.
Ray restarts it when its process dies (``max_restarts=-1``); a new instance, like one
started after a whole-server restart, reads every job folder under ``jobs.data_dir`` back
and continues the unfinished jobs from their manifests. Use ``get_manager`` to reach it:
it creates the actor when absent and returns the running one otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

from serve_app.config import AppConfig
from serve_app.errors import NotReady, as_photo_error
from serve_app.jobs.gate import Gate
from serve_app.jobs.manifest import ManifestRecord
from serve_app.jobs.quota import Quota
from serve_app.jobs.scheduler import Scheduler
from serve_app.jobs.spec import ACTIVE, PENDING, JobSpec
from serve_app.options import EnhanceOptions

LOGGER = logging.getLogger(__name__)

NAMESPACE = "photoenhance"
INGRESS = "Ingress"
WATCH_MAX_S = 5.0


def jobs_dir(config: AppConfig) -> Path:
    return Path(config.jobs.data_dir) / "jobs"


def configure_fsspec(config: AppConfig) -> None:
    """Apply ``jobs.storage.fsspec`` options (an S3 endpoint, say) to every filesystem this
    process makes; each process that touches storage calls it."""
    import fsspec.config

    for protocol, options in config.jobs.storage.fsspec.items():
        fsspec.config.conf[protocol] = {**fsspec.config.conf.get(protocol, {}), **options}


class JobManager:
    """The actor's class (wrapped with ``ray.remote`` by ``get_manager``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        configure_fsspec(self.config)
        self.scheduler: Scheduler | None = None
        # Start (and recover jobs) as soon as the actor runs, also after Ray restarts it:
        # a call to itself, queued behind __init__.
        ray.get_runtime_context().current_actor.start.remote()

    async def start(self) -> dict[str, Any]:
        if self.scheduler is None:
            from ray import serve

            handle = serve.get_deployment_handle(INGRESS, app_name=self.config.name)
            enhance = handle.options(method_name="enhance")

            async def dispatch(data: bytes, options: EnhanceOptions) -> Any:
                return await enhance.remote(data, options)

            jobs = self.config.jobs
            scheduler = Scheduler(
                jobs,
                dispatch,
                max_bytes=self.config.limits.max_bytes,
                timeout_s=self.config.ingress.request_timeout_s + 30.0,
                gate=Gate(self.config),
            )
            self.scheduler = scheduler
            resumed = scheduler.recover(jobs_dir(self.config))
            scheduler.start()
            if resumed:
                LOGGER.warning("resumed %d unfinished job(s): %s", len(resumed), resumed)
        return {"pid": os.getpid(), "jobs": len(self.scheduler.jobs)}

    async def configure(self, config: dict[str, Any]) -> None:
        """Apply a redeployed application's config (limits, retries, roots; a new data
        folder is scanned for unfinished jobs too)."""
        new = AppConfig.model_validate(config)
        if new == self.config:
            return
        scheduler = await self._scheduler()
        old_dir, self.config = jobs_dir(self.config), new
        scheduler.config = new.jobs
        scheduler.max_bytes = new.limits.max_bytes
        scheduler.timeout_s = new.ingress.request_timeout_s + 30.0
        scheduler.gate = Gate(new)
        configure_fsspec(new)
        if jobs_dir(new) != old_dir:
            scheduler.recover(jobs_dir(new))
        scheduler.wake()

    async def _scheduler(self) -> Scheduler:
        await self.start()
        assert self.scheduler is not None
        return self.scheduler

    async def pid(self) -> int:
        return os.getpid()

    async def create_job(self, spec: JobSpec) -> dict[str, Any]:
        """Start a job the intake validated (the spec arrives as the object, not re-parsed).
        A key's quota is checked here, in the one actor every ingress replica calls, in the
        same step that registers the job: no other creation interleaves (429 when over)."""
        scheduler = await self._scheduler()
        auth = self.config.auth
        quota = Quota(auth.max_jobs_in_flight, auth.max_items_in_flight)
        job = await scheduler.submit(spec, jobs_dir(self.config) / spec.job_id, quota)
        return job.snapshot()

    async def list_jobs(
        self, state: str | None = None, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """Snapshots, newest first; ``owner`` None: everyone's."""
        scheduler = await self._scheduler()
        jobs = sorted(scheduler.jobs.values(), key=lambda j: j.spec.created_at, reverse=True)
        return [
            j.snapshot() for j in jobs
            if (state is None or j.state == state) and (owner is None or j.spec.owner == owner)
        ]

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return (await self._scheduler()).get(job_id).snapshot()

    async def watch(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """The job's snapshot after its next state change, or after ``timeout_s``."""
        job = (await self._scheduler()).get(job_id)
        await job.wait_state_change(min(timeout_s, WATCH_MAX_S))
        return job.snapshot()

    async def items(
        self, job_id: str, offset: int, limit: int, status: str | None
    ) -> dict[str, Any]:
        job = (await self._scheduler()).get(job_id)
        return await asyncio.to_thread(job.items, offset, limit, status)

    async def record(self, job_id: str, index: int) -> ManifestRecord | None:
        job = (await self._scheduler()).get(job_id)
        return await asyncio.to_thread(job.record, index)

    async def backlog(self) -> int:
        """Items not yet dispatched in queued and running jobs (paused ones wait for a person,
        not for replicas): what the model replicas report to the autoscaling policy."""
        if self.scheduler is None:
            return 0
        jobs = self.scheduler.jobs.values()
        return sum(job.counts[PENDING] for job in jobs if job.state in ACTIVE)

    async def control(self, job_id: str, action: str) -> dict[str, Any]:
        return (await self._scheduler()).control(job_id, action).snapshot()

    async def delete(self, job_id: str) -> None:
        await (await self._scheduler()).delete(job_id)


def manager_name(config: AppConfig) -> str:
    return f"{config.name}-jobs"


_HANDLES: dict[str, Any] = {}
HEAD_RESOURCE = "node:__internal_head__"  # ray._common.constants.HEAD_NODE_RESOURCE_NAME


def get_manager(config: AppConfig) -> Any:
    """The job actor's handle: created (detached, restartable) if absent, else the live one."""
    name = manager_name(config)
    handle = _HANDLES.get(name)
    if handle is None:
        actor = ray.remote(JobManager).options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_concurrency=1000,
            num_cpus=0,
            # On the head: a 0-CPU actor fits any node, and one on a GPU node would keep that
            # node from scaling down and die with it (docs/SCALING.md, "Failures").
            resources={HEAD_RESOURCE: 0.001},
        )
        handle = actor.remote(config.model_dump(mode="json"))
        _HANDLES[name] = handle
    return handle


def forget_manager(config: AppConfig) -> None:
    _HANDLES.pop(manager_name(config), None)


ACTOR_RETRY_S = 30.0


def start_manager(config: AppConfig) -> None:
    """Create the job actor now (when Ray runs), so unfinished jobs resume at once rather
    than on the first jobs request. Called by the ingress replica as it starts."""
    if not ray.is_initialized():
        return
    try:
        get_manager(config).configure.remote(config.model_dump(mode="json"))
    except Exception:
        LOGGER.exception("cannot start the job actor; it starts on first use")


async def call_manager(config: AppConfig, method: str, *args: Any) -> Any:
    """Call the job actor, waiting out a restart; its errors come back as raised."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    deadline = time.monotonic() + ACTOR_RETRY_S
    while True:
        handle = get_manager(config)
        try:
            return await getattr(handle, method).remote(*args)
        except (RayActorError, ActorUnavailableError) as exc:
            err = as_photo_error(exc)
            if err is not None:
                raise err from None
            # Restarting, or gone for good: look it up (or create it) again by name.
            forget_manager(config)
            if time.monotonic() > deadline:
                raise NotReady("the job manager is restarting; retry", retry_after_s=2) from None
            await asyncio.sleep(0.25)
        except Exception as exc:
            err = as_photo_error(exc)
            if err is not None:
                raise err from None
            raise
