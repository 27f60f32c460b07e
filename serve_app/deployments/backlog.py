"""The job backlog as a model replica reports it to the autoscaling policy.

The policy (``serve_app.deployments.autoscaling``) adds the items the job actor has not
dispatched yet to the requests waiting at the model replicas; the replicas read that number
from the job actor here and report it through ``record_autoscaling_stats``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import ray

from serve_app.config import AppConfig
from serve_app.deployments.autoscaling import JOB_BACKLOG_METRIC
from serve_app.jobs import NAMESPACE, manager_name

LOGGER = logging.getLogger(__name__)


class BacklogProbe:
    """Reads the job actor's backlog for a model replica's ``record_autoscaling_stats``.

    Never raises and never waits longer than ``timeout_s``: a slow or missing job actor
    yields the last value read (0 before any), so the replica's metrics push is not held
    up. The actor is looked up by name, at most every ``lookup_every_s`` while absent.

        self._backlog = BacklogProbe.for_app(self.config)   # in Enhancer.__init__
        async def record_autoscaling_stats(self) -> dict[str, float]:
            return {"in_flight": float(self._in_flight), **await self._backlog.stats()}
    """

    def __init__(
        self,
        actor_name: str,
        *,
        namespace: str | None = NAMESPACE,
        method: str = "backlog",
        timeout_s: float = 1.0,
        lookup_every_s: float = 5.0,
        metric: str = JOB_BACKLOG_METRIC,
    ) -> None:
        self.actor_name = actor_name
        self.namespace = namespace
        self.method = method
        self.timeout_s = timeout_s
        self.lookup_every_s = lookup_every_s
        self.metric = metric
        self.last = 0.0
        self._actor: Any = None
        self._looked_up_at = -math.inf

    @classmethod
    def for_app(cls, app: AppConfig, **kwargs: Any) -> BacklogProbe:
        """The probe of this application's job actor."""
        return cls(manager_name(app), namespace=NAMESPACE, **kwargs)

    async def stats(self) -> dict[str, float]:
        return {self.metric: await self.read()}

    async def read(self) -> float:
        actor = await self._lookup()
        if actor is None:
            return self.last
        try:
            ref = getattr(actor, self.method).remote()
            value = float(await asyncio.wait_for(_awaitable(ref), self.timeout_s))
        except TimeoutError:
            LOGGER.debug("job backlog: %s.%s timed out", self.actor_name, self.method)
            return self.last
        except Exception:
            # The actor died or is being restarted: look it up again next time.
            LOGGER.debug("job backlog: %s.%s failed", self.actor_name, self.method, exc_info=True)
            self._actor = None
            return self.last
        if math.isfinite(value):
            self.last = max(value, 0.0)
        return self.last

    async def _lookup(self) -> Any:
        if self._actor is not None:
            return self._actor
        now = time.monotonic()
        if now - self._looked_up_at < self.lookup_every_s:
            return None
        self._looked_up_at = now
        if not ray.is_initialized():
            return None
        try:
            self._actor = await asyncio.wait_for(
                asyncio.to_thread(ray.get_actor, self.actor_name, self.namespace), self.timeout_s
            )
        except Exception:  # absent (no job yet) or GCS slow: keep the last value
            self._actor = None
        return self._actor


async def _awaitable(ref: Any) -> Any:
    return await ref
