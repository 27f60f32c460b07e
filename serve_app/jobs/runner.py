"""Enhance a folder or bucket prefix from a Ray job, through the application's handle:
``run_job``, which ``python -m serve_app.cli.run`` (the command a Ray job submits) calls.

Items are listed lazily and sent to the running application (``serve.get_app_handle``) with
at most ``--concurrency`` in flight; each output is written atomically and recorded in
``manifest.jsonl`` (same format as HTTP jobs) in the state folder, which is the output
folder when that is local. Run the same command again and it resumes: recorded items are
skipped, the rest are dispatched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from serve_app.config import APP_NAME, JobsConfig, LimitsConfig
from serve_app.errors import Conflict, InvalidRequest
from serve_app.jobs.job import Job
from serve_app.jobs.naming import new_job_id
from serve_app.jobs.scheduler import Scheduler
from serve_app.jobs.spec import JOB_JSON, TERMINAL, JobSpec, read_json
from serve_app.jobs.storage import is_local, local_path
from serve_app.options import EnhanceOptions

LOGGER = logging.getLogger(__name__)


def state_folder(output: str, state_dir: str | None) -> Path:
    if state_dir:
        return Path(state_dir).expanduser().resolve()
    if not is_local(output):
        raise InvalidRequest("a remote --output needs a local --state-dir for the manifest")
    return local_path(output).resolve()


def open_or_create(folder: Path, input_uri: str, output: str, options: EnhanceOptions) -> Job:
    """The job in ``folder``: read back when it exists (same input and options), else new."""
    if (folder / JOB_JSON).is_file():
        spec = JobSpec.model_validate(read_json(folder / JOB_JSON))
        if (spec.input_prefix, spec.output, spec.options) != (input_uri, output, options):
            raise Conflict(
                f"{folder} holds a run with another input, output or options; "
                "use another --state-dir or --output",
                code="state_mismatch",
            )
        return Job.open(folder)
    spec = JobSpec(
        job_id=new_job_id(),
        created_at=time.time(),
        kind="prefix",
        input_prefix=input_uri,
        output=output,
        options=options,
        total=None,
    )
    return Job.create(spec, folder)


async def run_job(
    input_uri: str,
    output: str,
    options: EnhanceOptions,
    *,
    app_name: str = APP_NAME,
    concurrency: int = 8,
    state_dir: str | None = None,
    max_attempts: int = 3,
    max_bytes: int = LimitsConfig().max_bytes,
    progress: bool = False,
) -> dict[str, Any]:
    """Run (or resume) one job to its end; returns its final snapshot."""
    from ray import serve

    folder = state_folder(output, state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    job = open_or_create(folder, input_uri, output, options)
    if job.state in TERMINAL:
        return job.snapshot()
    if job.state == "paused":  # paused by a low disk, say; a re-run means go on
        job.set_state("running")

    enhance = serve.get_app_handle(app_name).options(method_name="enhance")

    async def dispatch(data: bytes, opts: EnhanceOptions) -> Any:
        return await enhance.remote(data, opts)

    config = JobsConfig(
        data_dir=folder,
        max_inflight=concurrency,
        max_inflight_per_job=concurrency,
        max_attempts=max_attempts,
        min_free_bytes=0,
        allow_private_urls=True,  # the submitter of a Ray job is trusted
        retention_s=None,  # the state folder is the caller's (often the output folder)
    )
    scheduler = Scheduler(config, dispatch, max_bytes=max_bytes, timeout_s=600.0, gate=None)
    job.close()
    job = scheduler.adopt(folder)
    scheduler.start()
    bar = _bar(job) if progress else None
    try:
        while job.state not in TERMINAL and job.state != "paused":
            await asyncio.sleep(0.5)
            if bar is not None:
                bar.total = job.total
                bar.n = job.done
                bar.set_postfix_str(f"{job.counts[3]} failed", refresh=False)
                bar.refresh()
    finally:
        await scheduler.stop()
        if bar is not None:
            bar.close()
    return job.snapshot()


def _bar(job: Job) -> Any:
    from tqdm import tqdm

    return tqdm(total=job.total, initial=job.done, unit="img", desc=job.id, dynamic_ncols=True)
