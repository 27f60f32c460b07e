"""A prefix job's inputs, listed lazily: appended to ``inputs.jsonl`` in chunks while its
first items already run; a listing cut short by a restart is re-done in the same sorted
order, skipping what is known."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from serve_app.jobs import sources
from serve_app.jobs.job import Job

LOGGER = logging.getLogger(__name__)

LIST_CHUNK = 512


async def list_prefix(job: Job, wake: Callable[[], None]) -> bool:
    """List ``job``'s ``input_prefix`` to its end (``wake`` after each chunk: items to run).
    False when listing failed (the job is then failed, ``listing_failed``)."""
    prefix = job.spec.input_prefix or ""
    entries = sources.iter_prefix(prefix)
    skip = len(job.inputs)
    await asyncio.to_thread(lambda: next(itertools.islice(entries, skip, skip), None))
    try:
        while True:
            chunk = await asyncio.to_thread(lambda: list(itertools.islice(entries, LIST_CHUNK)))
            if not chunk:
                break
            items = [(uri, uri) for uri in chunk]
            await asyncio.to_thread(job.inputs.append, items)
            job.add_items(len(items))
            wake()
    except asyncio.CancelledError:
        raise
    except Exception:
        LOGGER.exception("job %s: listing %s failed", job.id, prefix)
        job.set_state("failed", "listing_failed")
        return False
    job.listed = True
    job.save_state()
    job.touch(state_changed=True)
    return True
