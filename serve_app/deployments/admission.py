"""The ingress's door: a bounded FIFO queue in front of the model, with a queue deadline.

At most ``max_active`` requests are past the door at once (decoding, in the model, encoding).
Up to ``max_waiting`` more wait in arrival order. A request is shed with ``503 overloaded``
when it finds the queue full, when the queue ahead of it would take longer than ``timeout_s``
to drain at the measured pace, or when it has waited ``timeout_s`` without getting in: no
request waits without bound, so the accepted ones keep a bounded latency (at most
``timeout_s`` at the door plus ``max_active`` / drain rate past it).
``Retry-After`` is the time the queue ahead would take to drain at the completion rate
measured over the last ``window_s`` seconds.

Pure asyncio, no Ray: one gate per ingress replica, used from its event loop only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from serve_app.errors import Overloaded

MAX_RETRY_AFTER_S = 120


class AdmissionGate:
    def __init__(
        self,
        max_active: int,
        max_waiting: int,
        timeout_s: float,
        *,
        window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_active < 1 or max_waiting < 0 or timeout_s <= 0:
            raise ValueError("max_active >= 1, max_waiting >= 0 and timeout_s > 0 are needed")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.window_s = window_s
        self._clock = clock
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._finished: deque[float] = deque()  # completion times within the window
        self._started = clock()

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def drain_rate(self) -> float:
        """Completions per second over the last ``window_s`` (0.0 before the first)."""
        now = self._clock()
        while self._finished and now - self._finished[0] > self.window_s:
            self._finished.popleft()
        if not self._finished:
            return 0.0
        span = min(self.window_s, max(now - self._started, 1.0))
        return len(self._finished) / span

    def retry_after_s(self) -> int:
        """Seconds until the queue ahead of a new arrival would have drained."""
        rate = self.drain_rate()
        if rate <= 0:
            return max(1, math.ceil(self.timeout_s))
        ahead = self.waiting + self._active
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(ahead / rate)))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one place past the door for the body of the ``async with``."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._active < self.max_active and not self._waiters:
            self._active += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise self._shed(f"the queue is full ({self.max_waiting} waiting); retry later")
        rate = self.drain_rate()
        if rate > 0 and (len(self._waiters) + 1) / rate > self.timeout_s:
            # At the measured pace it would pass the deadline anyway: say so now.
            raise self._shed("the queue ahead would take longer than its deadline; retry later")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=self.timeout_s)
        except BaseException:  # the caller went away while waiting
            self._abandon(waiter)
            raise
        if not waiter.done():
            self._abandon(waiter)
            raise self._shed(
                f"waited {self.timeout_s:g}s in the queue without getting in; retry later"
            )
        # Done: a finishing request handed its place over (``_release``).

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self._release(finished=False)  # handed over just now: pass it on
            return
        waiter.cancel()
        with suppress(ValueError):
            self._waiters.remove(waiter)

    def _release(self, *, finished: bool = True) -> None:
        if finished:
            self._finished.append(self._clock())
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes to the oldest waiter
                return
        self._active -= 1

    def _shed(self, message: str) -> Overloaded:
        return Overloaded(message, retry_after_s=self.retry_after_s())
