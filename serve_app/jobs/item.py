"""One item's path: fetch, enhance, retry, then write the output and record it.

``ItemRunner.run`` is one item's task. It reads the input (at most
``max_fetches_per_job`` fetches at once per job, through the gate), calls ``dispatch`` (the
ingress's ``enhance``), retries by ``classify`` of the error (exponential ``backoff`` with
jitter; a 4xx fails at once; an application that is down is waited for without spending an
attempt; a replica that died under the item makes it a suspect), then *finalizes*: the
output written atomically and its ``ManifestRecord`` appended, in a step shielded from
cancellation, so an item is recorded whole or not at all.

What an item ends with travels as a ``manifest.ItemOutcome``, whose fields are the manifest
record's (less ``index``, ``status`` and ``finished_at``, which recording adds). The job's life (which
item runs when, quotas, pauses, expiry) is ``scheduler.py``'s; it is this module's ``Host``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol

from serve_app.config import JobsConfig
from serve_app.errors import as_photo_error
from serve_app.jobs import sources
from serve_app.jobs.gate import ForbiddenPath, Gate
from serve_app.jobs.job import Job
from serve_app.jobs.manifest import ItemError, ItemOutcome
from serve_app.options import EnhanceOptions

LOGGER = logging.getLogger(__name__)

Dispatch = Callable[[bytes, EnhanceOptions], Awaitable[Any]]

UNAVAILABLE = frozenset({"not_ready", "DeploymentUnavailableError"})
# A replica died while it held the item: the ingress's answer when its model replica went
# away, or Ray's own error when the ingress replica did (ActorUnavailableError, a replica
# that may come back, is not a death).
DIED_CODES = frozenset({"replica_unavailable"})
DIED_ERRORS = frozenset({"ActorDiedError", "RayActorError"})
REPLICA_DIED = "replica_died"
REPLICA_DIED_MESSAGES = (
    "a model replica died while it enhanced this file, with no attempts left; not retried",
    "a model replica died while it enhanced this file, and again on its one retry alone; "
    "the file was not retried further",
)


def classify(exc: BaseException) -> tuple[str, str, str]:
    """``(kind, code, message)``. ``kind`` is ``permanent`` for 4xx errors (the item fails at
    once), ``unavailable`` when the application is not running (wait, without spending an
    attempt), ``died`` when the replica holding the item died (the poison-pill rule of
    ``ItemRunner._attempts``) and ``transient`` for everything else: overload, timeouts,
    other Ray errors, a 5xx from a source."""
    err = as_photo_error(exc)
    if err is not None:
        if err.code in UNAVAILABLE:
            return "unavailable", err.code, err.message
        if err.code in DIED_CODES:
            return "died", err.code, err.message
        return ("transient" if err.status >= 500 else "permanent"), err.code, err.message
    if isinstance(exc, TimeoutError):
        return "transient", "timeout", "the enhancement did not finish in time"
    name = type(exc).__name__
    if name in DIED_ERRORS:
        return "died", "replica_unavailable", "a replica went away while it held this item"
    message = f"{name}: {str(exc)[:300]}"
    if name in UNAVAILABLE:
        return "unavailable", "app_unavailable", message
    return "transient", "ray_error" if "Ray" in name or "Actor" in name else "internal_error", message


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: half the capped delay fixed, half random."""
    delay = min(cap, base * 2 ** (attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)


class Enhanced(Protocol):
    """What ``dispatch`` returns (the api's ``EnhancedImage``), as far as a record needs."""

    @property
    def data(self) -> bytes: ...
    @property
    def format(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def faces(self) -> int: ...
    @property
    def face_boxes(self) -> Sequence[tuple[int, int, int, int]]: ...


@dataclass(frozen=True, kw_only=True)
class Tried:
    """How an item's attempts ended: the enhanced image, or the error that ended them."""

    source: str  # as the client named it: a URI, or an upload's filename
    attempts: int
    started: float  # time.perf_counter() at the first attempt
    result: Enhanced | None = None
    error: ItemError | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Host(Protocol):
    """What an item needs of the scheduler that runs it. Settings are read at each use, as
    the job actor replaces them when the application is redeployed."""

    config: JobsConfig
    dispatch: Dispatch
    max_bytes: int
    timeout_s: float
    gate: Gate | None  # None: a trusted runner (a Ray job) that may read anything

    def give_back(self, job: Job, index: int, pause_reason: str | None = None) -> None:
        """The item goes back to pending; with a reason, its job pauses."""

    def finished(self, job: Job) -> None:
        """The item is recorded (``Job.finish`` done): its slot is free."""


class ItemRunner:
    """Runs items for a ``Host``; holds what items share: per-job fetch slots, and the
    quarantine that suspects take turns in."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._fetch_slots: dict[str, asyncio.Semaphore] = {}
        # Suspects (an item whose replica died under it) retry one at a time, so that a
        # file that kills replicas never shares its retry with another suspect.
        self._quarantine = asyncio.Lock()

    def forget(self, job_id: str) -> None:
        self._fetch_slots.pop(job_id, None)

    async def run(self, job: Job, index: int) -> None:
        """One item's task: its attempts, then its output and record."""
        try:
            tried = await self._attempts(job, index)
        except Exception:
            # Not the item's fault (its input list or storage is unreadable, say).
            LOGGER.exception("job %s item %d: unexpected failure", job.id, index)
            self.host.give_back(job, index, pause_reason="internal_error")
            return
        # Shielded: cancels that land now (a job's cancel, then the scheduler's stop) still
        # leave the output and its record whole; the item is then finished, not cancelled,
        # so the task ends normally and nothing is given back twice.
        finalize = asyncio.ensure_future(self._finalize(job, index, tried))
        while not finalize.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(finalize)

    def _fetch_slot(self, job: Job) -> asyncio.Semaphore:
        slot = self._fetch_slots.get(job.id)
        if slot is None:
            slot = asyncio.Semaphore(self.host.config.max_fetches_per_job)
            self._fetch_slots[job.id] = slot
        return slot

    def _gate_for(self, job: Job, source: str) -> Gate | None:
        """An upload's items are the job's own spooled files, which no gate root holds (the
        jobs folder is nobody's input): they are read only from inside that folder."""
        gate = self.host.gate
        if job.spec.kind != "upload" or gate is None:
            return gate
        if not Path(source).resolve().is_relative_to((job.folder / "inputs").resolve()):
            raise ForbiddenPath("an upload's item is outside its job's folder")
        return None

    async def _fetch(self, job: Job, source: str) -> bytes:
        async with self._fetch_slot(job):
            return await sources.fetch(source, max_bytes=self.host.max_bytes,
                                       timeout_s=self.host.config.fetch_timeout_s,
                                       gate=self._gate_for(job, source))

    async def _enhance(self, data: bytes, options: EnhanceOptions, *, suspect: bool) -> Any:
        """The model call; a suspect's waits for its turn in the quarantine."""
        host = self.host
        if not suspect:
            return await asyncio.wait_for(host.dispatch(data, options), host.timeout_s)
        async with self._quarantine:  # the call starts only once it is the suspect's turn
            return await asyncio.wait_for(host.dispatch(data, options), host.timeout_s)

    async def _attempts(self, job: Job, index: int) -> Tried:
        source, name = await asyncio.to_thread(job.inputs.get, index)
        named = name if job.spec.kind == "upload" else source  # never the spooled path
        options = job.spec.options
        host = self.host
        t0 = time.perf_counter()
        attempt = unavailable = deaths = 0
        while True:
            attempt += 1
            stage = "fetch"
            try:
                t_fetch = time.perf_counter()
                data = await self._fetch(job, source)
                stage = "enhance"
                t_enh = time.perf_counter()
                result = await self._enhance(data, options, suspect=deaths > 0)
                del data
                timings = {"fetch": t_enh - t_fetch, "enhance": time.perf_counter() - t_enh}
                return Tried(source=named, attempts=attempt, started=t0, result=result,
                             timings=timings)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                kind, code, message = classify(exc)
                config = host.config
                if kind == "unavailable":
                    attempt -= 1  # the application is down: wait for it, spend nothing
                    unavailable += 1
                    delay = backoff(min(unavailable, 8), config.retry_base_s, config.retry_max_s)
                    LOGGER.info("job %s item %d: %s, waiting %.1fs", job.id, index, code, delay)
                    await asyncio.sleep(delay)
                    continue
                if kind == "died":
                    # The poison-pill rule: a replica that died under the item may have died
                    # of it, or of a neighbour in its batch. The item is a suspect: retried
                    # once, alone among suspects; a second death fails it, so a file that
                    # kills replicas kills at most two (docs/JOBS.md, "Retries").
                    deaths += 1
                    LOGGER.warning("job %s item %d: its replica died (%s), death %d", job.id,
                                   index, message, deaths)
                    if deaths >= 2 or attempt >= config.max_attempts:
                        error = ItemError(code=REPLICA_DIED, stage=stage,
                                          message=REPLICA_DIED_MESSAGES[deaths >= 2])
                        return Tried(source=named, attempts=attempt, started=t0, error=error)
                if kind == "permanent" or attempt >= config.max_attempts:
                    error = ItemError(code=code, message=message, stage=stage)
                    return Tried(source=named, attempts=attempt, started=t0, error=error)
                delay = backoff(attempt, config.retry_base_s, config.retry_max_s)
                LOGGER.info("job %s item %d: %s (%s), retry in %.2fs", job.id, index, code,
                            message, delay)
                await asyncio.sleep(delay)

    async def _finalize(self, job: Job, index: int, tried: Tried) -> None:
        try:
            offset, ok = await asyncio.to_thread(write_and_record, job, index, tried)
        except Exception:
            LOGGER.exception("job %s item %d: cannot write its output or record", job.id, index)
            self.host.give_back(job, index, pause_reason="storage_error")
            return
        job.finish(index, ok, offset)
        self.host.finished(job)


def write_and_record(job: Job, index: int, tried: Tried) -> tuple[int, bool]:
    """Write the output (atomically) and append its manifest record; runs in a thread.
    Returns the record's offset and whether the item succeeded."""
    outcome = _write(job, index, tried)
    offset = job.open_writer().append(outcome.record(index))
    return offset, outcome.succeeded


def _write(job: Job, index: int, tried: Tried) -> ItemOutcome:
    result = tried.result
    timings = dict(tried.timings)
    if result is None:
        timings["total"] = time.perf_counter() - tried.started
        return ItemOutcome(source=tried.source, attempts=tried.attempts, error=tried.error,
                           timings=_rounded(timings))
    name = job.output_name(index, result.format)
    t = time.perf_counter()
    job.storage.write_atomic(name, result.data)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - tried.started
    return ItemOutcome(
        source=tried.source,
        attempts=tried.attempts,
        timings=_rounded(timings),
        name=name,
        bytes=len(result.data),
        sha256=sha256(result.data).hexdigest(),
        crc32=zlib.crc32(result.data),
        width=result.width,
        height=result.height,
        format=result.format,
        faces=result.faces,
        face_boxes=list(result.face_boxes),
    )


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in timings.items()}
