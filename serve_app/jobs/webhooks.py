"""Job callbacks: when a job ends, a signed summary is POSTed to the URL the job named.

The URL passes the gate's outbound checks (``Gate.url``) at submission and again before
every attempt (DNS may change): no private, loopback or link-local address unless
``jobs.allow_private_urls``; redirects are not followed.

Signature (HMAC-SHA256, hex): ``X-PhotoEnhance-Signature: sha256=HMAC(secret, f"{ts}.{body}")``
with ``X-PhotoEnhance-Timestamp: ts`` (Unix seconds). A receiver recomputes it over the raw
body, compares in constant time, and refuses timestamps older than a few minutes (replays).
The secret is per API key: ``HMAC(jobs.webhook_secret, "webhook:" + key name)`` (see
``secret_for``), so one key's receiver cannot forge another's; jobs without an owner (keys
off) are signed with ``jobs.webhook_secret`` itself. Without a configured secret, jobs
cannot name a callback (400 ``webhooks_disabled``).

Delivery is retried with exponential backoff and jitter (tenacity) on network errors, 5xx
and 429, up to ``jobs.webhook_attempts``; any other answer ends it. The outcome is recorded
in the job (``callback`` in its snapshot, kept in ``state.json``); a job whose callback was
still pending when the actor restarted is notified again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from serve_app.config import JobsConfig
from serve_app.errors import InvalidRequest
from serve_app.jobs.gate import Gate

LOGGER = logging.getLogger(__name__)

SECRET_ENV = "PHOTOENHANCE_WEBHOOK_SECRET"
SIGNATURE = "X-PhotoEnhance-Signature"
TIMESTAMP = "X-PhotoEnhance-Timestamp"
EVENT = "X-PhotoEnhance-Event"
DELIVERY = "X-PhotoEnhance-Delivery"


class Retryable(Exception):
    """A failed attempt worth repeating (network error, 5xx, 429)."""


def server_secret(config: JobsConfig) -> str | None:
    return config.webhook_secret or os.environ.get(SECRET_ENV) or None


def secret_for(config: JobsConfig, owner: str | None) -> bytes:
    """The signing secret of ``owner``'s callbacks (give it to that key's holder)."""
    master = server_secret(config)
    if master is None:
        raise InvalidRequest("callbacks are not enabled on this server", code="webhooks_disabled")
    if owner is None:
        return master.encode()
    return hmac.new(master.encode(), f"webhook:{owner}".encode(), hashlib.sha256).digest()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str,
           max_age_s: float = 300.0) -> bool:
    """What a receiver does (also used by the tests)."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def summary(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What the receiver gets: the job's outcome, no server internals."""
    keys = ("job_id", "state", "reason", "reason_code", "total", "counts", "created_at",
            "started_at", "finished_at", "owner")
    return {"event": "job.ended", **{k: snapshot.get(k) for k in keys},
            "urls": {"self": f"/v1/jobs/{snapshot['job_id']}",
                     "results": f"/v1/jobs/{snapshot['job_id']}/results.zip",
                     "manifest": f"/v1/jobs/{snapshot['job_id']}/manifest.jsonl"}}


async def deliver(url: str, payload: dict[str, Any], *, secret: bytes, gate: Gate | None,
                  config: JobsConfig, record: dict[str, Any]) -> dict[str, Any]:
    """POST ``payload`` until it is taken or attempts run out; ``record`` (the job's
    ``callback`` entry) is updated after every attempt and returned."""
    import asyncio

    import httpx

    body = json.dumps(payload, separators=(",", ":")).encode()
    delivery = str(uuid.uuid4())

    async def attempt(client: httpx.AsyncClient) -> None:
        record["attempts"] = record.get("attempts", 0) + 1
        record["at"] = round(time.time(), 3)
        try:
            target, extra, extensions = url, {}, {}
            if gate is not None:  # checked again: DNS may have changed since submission
                pinned = await asyncio.to_thread(gate.pin, url)
                target, extra, extensions = pinned.url, pinned.headers, pinned.extensions
            ts = int(time.time())
            response = await client.post(target, content=body, extensions=extensions, headers={
                **extra, "Content-Type": "application/json", TIMESTAMP: str(ts),
                SIGNATURE: sign(secret, ts, body), EVENT: "job.ended", DELIVERY: delivery,
            })
        except httpx.HTTPError as exc:
            record["status"] = None
            record["error"] = "network_error"
            LOGGER.info("callback %s: %r", delivery, exc)
            raise Retryable() from None
        except Exception as exc:  # the gate refused (the host now resolves privately, say)
            record["status"] = None
            record["error"] = getattr(exc, "code", "refused")
            raise
        record["status"] = response.status_code
        record["error"] = None
        if response.status_code == 429 or response.status_code >= 500:
            raise Retryable()
        if response.status_code >= 300:
            record["error"] = "refused_by_receiver"

    retrying = AsyncRetrying(
        stop=stop_after_attempt(config.webhook_attempts),
        wait=wait_exponential_jitter(initial=config.retry_base_s, max=config.retry_max_s),
        retry=retry_if_exception_type(Retryable),
        reraise=True,
    )
    try:
        async with httpx.AsyncClient(timeout=config.webhook_timeout_s,
                                     follow_redirects=False) as client:
            async for try_ in retrying:
                with try_:
                    await attempt(client)
    except Exception:
        pass  # recorded above
    ok = record.get("status") is not None and 200 <= record["status"] < 300
    record["state"] = "delivered" if ok else "failed"
    return record
