"""Bounded progress streams (server-sent events and WebSocket) of one job.

Every stream holds a slot: at most ``http.max_streams`` per ingress replica (503 when full)
and ``http.max_streams_per_job`` per job (429), so streams can never take all of the
ingress's concurrent requests. A stream sends a heartbeat (an SSE comment) every
``http.stream_heartbeat_s``, and it ends:

- after the job's final state (``end`` reason ``finished``),
- when the job has not changed for ``http.stream_idle_timeout_s`` (``idle``: a paused
  job, say; reconnect to keep watching),
- when the job goes away (``gone``, e.g. deleted).

The last message says so, so a client tells a normal end from a dropped connection: an SSE
``event: end`` whose data is ``{"reason": ...}``, or a WebSocket message
``{"event": "end", "reason": ...}`` before a normal close (1000).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from serve_app.config import HttpConfig
from serve_app.errors import Overloaded, PhotoEnhanceError, TooManyRequests

LOGGER = logging.getLogger(__name__)

Progress = Callable[[], AsyncIterator[dict[str, Any]]]


class StreamSlots:
    """Counts of open streams, in total and per job (one ingress replica)."""

    def __init__(self, total: int, per_job: int) -> None:
        self.total = total
        self.per_job = per_job
        self._open: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return sum(self._open.values())

    def acquire(self, job_id: str) -> Callable[[], None]:
        """Take a slot for ``job_id``; returns its (idempotent) release."""
        if self.open >= self.total:
            raise Overloaded(
                "too many open event streams; retry later", code="too_many_streams",
                retry_after_s=5,
            )
        if self._open[job_id] >= self.per_job:
            raise TooManyRequests(
                f"this job already has {self.per_job} open event streams",
                code="too_many_streams", retry_after_s=5,
            )
        self._open[job_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[job_id] -= 1
                if self._open[job_id] <= 0:
                    del self._open[job_id]

        return release


class JobStreams:
    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.slots = StreamSlots(config.max_streams, config.max_streams_per_job)

    async def events(self, job_id: str, progress: Progress) -> Response:
        """An SSE response of ``progress()`` snapshots; errors before the first one (404)
        are raised, so they get their JSON answer."""
        from sse_starlette import EventSourceResponse

        release = self.slots.acquire(job_id)
        try:
            snapshots = self._bounded(progress())
            first = await anext(snapshots)
        except BaseException:
            release()
            raise

        async def messages() -> AsyncIterator[dict[str, Any]]:
            try:
                yield _sse(first)
                async for item in snapshots:
                    yield _sse(item)
            finally:
                release()

        body = messages()
        weakref.finalize(body, release)  # also when the response never starts
        # no-cache, as the SSE spec advises: with sse-starlette's default no-store, Chromium
        # reports every fetch()-read stream as aborted even when it ended normally.
        return EventSourceResponse(body, ping=self.config.stream_heartbeat_s,
                                   headers={"Cache-Control": "no-cache"})

    async def websocket(self, websocket: WebSocket, job_id: str, progress: Progress) -> None:
        await websocket.accept()
        try:
            release = self.slots.acquire(job_id)
        except PhotoEnhanceError as exc:
            await _ws_error(websocket, exc)
            return
        try:
            async for item in self._bounded(progress()):
                await websocket.send_json(item)
        except PhotoEnhanceError as exc:
            await _ws_error(websocket, exc)
            return
        except WebSocketDisconnect:
            return
        finally:
            release()
        await websocket.close(code=1000)

    async def _bounded(
        self, snapshots: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        """The snapshots (sent as the job changes), then one
        ``{"event": "end", "reason": ...}``; a job quiet for the idle timeout ends it."""
        reason = "finished"
        sent = False
        try:
            while True:
                try:
                    snapshot = await asyncio.wait_for(
                        anext(snapshots), self.config.stream_idle_timeout_s
                    )
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    reason = "idle"
                    break
                except PhotoEnhanceError as exc:
                    if not sent:
                        raise  # e.g. no such job: a plain error answer
                    LOGGER.info("event stream ends: %s", exc.code)
                    reason = "gone"
                    break
                sent = True
                yield snapshot
        finally:
            await snapshots.aclose()  # type: ignore[attr-defined]
        yield {"event": "end", "reason": reason}


def _sse(item: dict[str, Any]) -> dict[str, Any]:
    if item.get("event") == "end":
        return {"event": "end", "data": json.dumps({"reason": item["reason"]})}
    message: dict[str, Any] = {"data": json.dumps(item)}
    if "version" in item:
        message["id"] = str(item["version"])
    return message


async def _ws_error(websocket: WebSocket, exc: PhotoEnhanceError) -> None:
    await websocket.send_json({"error": exc.to_dict()})
    await websocket.close(code=4000 + exc.status)
