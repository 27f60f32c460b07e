"""Bounded progress streams (server-sent events and WebSocket) of one job.

Every stream holds a slot: at most ``http.max_streams`` per ingress replica (503 when full),
a fair share of them per API key (``http.max_streams_per_key``, 429 ``too_many_key_streams``,
so one key cannot leave another none) and ``http.max_streams_per_job`` per job (429), so
streams can never take all of the ingress's concurrent requests. A stream sends a heartbeat (an SSE comment) every
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
import time
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
    """Counts of open streams, in total, per API key and per job (one ingress replica)."""

    def __init__(self, total: int, per_job: int, per_key: int | None = None) -> None:
        self.total = total
        self.per_job = per_job
        self.per_key = per_key or total
        self._open: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return sum(self._open.values())

    def acquire(self, job_id: str, key: str | None = None) -> Callable[[], None]:
        """Take a slot for ``job_id`` on behalf of ``key`` (None: keys off or a handle, no
        per-key share); returns its (idempotent) release."""
        # The key's own share first: a key at its share is told so (429), not that the
        # server is full.
        if key is not None and self._by_key[key] >= self.per_key:
            raise TooManyRequests(
                f"this key already has {self.per_key} open event streams, its share; "
                "close one first", code="too_many_key_streams", retry_after_s=5,
            )
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
        if key is not None:
            self._by_key[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                _take_one(self._open, job_id)
                if key is not None:
                    _take_one(self._by_key, key)

        return release


def _take_one(counts: Counter[str], name: str) -> None:
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]


class JobStreams:
    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.slots = StreamSlots(config.max_streams, config.max_streams_per_job,
                                 config.streams_per_key())

    async def events(self, job_id: str, progress: Progress, key: str | None = None) -> Response:
        """An SSE response of ``progress()`` snapshots; errors before the first one (404)
        are raised, so they get their JSON answer. ``key``: the API key's name, whose
        share of the slots the stream takes."""
        from sse_starlette import EventSourceResponse

        release = self.slots.acquire(job_id, key)
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

    async def websocket(self, websocket: WebSocket, job_id: str, progress: Progress,
                        key: str | None = None) -> None:
        await websocket.accept()
        try:
            release = self.slots.acquire(job_id, key)
        except PhotoEnhanceError as exc:
            await _ws_error(websocket, exc)
            return
        try:
            async for item in self._bounded(progress()):
                if "state" in item:  # a snapshot (the end message stays as documented)
                    # The server's send time: the stream's pace, whatever the client's.
                    item = {**item, "sent_at": time.time()}
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
