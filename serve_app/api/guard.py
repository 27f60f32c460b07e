"""Who may call what: the one place requests are authenticated, authorised by role, rate
limited per key and refused when a browser sends them from another site.

``Guard`` is ASGI middleware in front of every route. It stores the caller's ``Principal``
(or ``None`` when keys are off) in the request's state; routes read it with
``principal_of`` and decide only about ownership (a user's job or preset), never about keys.

- ``/v1/...`` needs a valid ``Authorization: Bearer <key>`` when keys are on (401 otherwise);
  ``/metrics`` needs an admin key; ``/``, ``/healthz`` and ``/readyz`` stay open.
- Each key has a token bucket (``auth.requests_per_second``, ``auth.burst``); an empty bucket
  answers 429 with ``Retry-After``. Buckets are per ingress replica.
- A request that changes something (POST, PUT, DELETE, PATCH; a WebSocket handshake) and
  carries an ``Origin`` that is neither this server nor a configured CORS origin is refused
  (403 ``cross_origin``): a page on another site cannot make a browser submit jobs, even
  to a server on 127.0.0.1 with keys off.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.api.errors import error_response
from serve_app.auth import KeyRing, Principal
from serve_app.config import AppConfig
from serve_app.errors import Forbidden, PhotoEnhanceError, TooManyRequests, Unauthorized

LOGGER = logging.getLogger(__name__)

UNSAFE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
ADMIN_PATHS = frozenset({"/metrics"})
MAX_BUCKETS = 10_000


def principal_of(conn: HTTPConnection) -> Principal | None:
    """The caller of a request that passed the guard (``None``: keys off)."""
    return conn.scope.get("state", {}).get("principal")


def owner_name(conn: HTTPConnection) -> str | None:
    """Whose a new job or preset is: the key's name (``None``: keys off, or a handle)."""
    principal = principal_of(conn)
    return principal.name if principal else None


def owner_filter(conn: HTTPConnection) -> str | None:
    """Whose jobs a request may see: a user key its own, an admin key (or keys off) all."""
    principal = principal_of(conn)
    return None if principal is None or principal.is_admin else principal.name


def route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class RateLimiter:
    """Token buckets by key name: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, name: str, now: float | None = None) -> float:
        """Take a token; 0.0 when there was one, else the seconds until there is."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[name] = (tokens, now)
        if len(self._buckets) > MAX_BUCKETS:  # names come from the key file, but stay bounded
            self._buckets.popitem(last=False)
        return wait


class Guard:
    def __init__(self, app: ASGIApp, config: AppConfig) -> None:
        self.app = app
        auth = config.auth
        self.keys = KeyRing(auth.keys_file, auth.keys_env) if auth.enabled else None
        self.limiter = RateLimiter(auth.requests_per_second, auth.burst)
        self.origins = frozenset(o.rstrip("/") for o in config.http.cors_origins)
        if self.keys is None:
            LOGGER.warning("API keys are OFF: anyone who can reach this server may use it")
        elif not self.keys.entries():
            LOGGER.error("API keys are on but none is configured: every /v1 request gets 401")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            principal = self.check(scope)
        except PhotoEnhanceError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> Principal | None:
        conn = HTTPConnection(scope)
        path = route_path(scope)
        if scope["type"] == "websocket" or scope.get("method") in UNSAFE_METHODS:
            self._check_origin(conn)
        if self.keys is None or not (path.startswith("/v1/") or path in ADMIN_PATHS):
            return None
        principal = self._authenticate(conn)
        if path in ADMIN_PATHS and not principal.is_admin:
            raise Forbidden("this needs an admin key")
        wait = self.limiter.take(principal.name)
        if wait > 0:
            raise TooManyRequests(
                "too many requests for this key; slow down", retry_after_s=math.ceil(wait)
            )
        return principal

    def _authenticate(self, conn: HTTPConnection) -> Principal:
        assert self.keys is not None
        scheme, _, key = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        principal = self.keys.authenticate(key.strip())
        if principal is None:
            raise Unauthorized("the API key is not valid")
        return principal

    def _check_origin(self, conn: HTTPConnection) -> None:
        origin = conn.headers.get("origin")
        if origin is None:  # not a browser, or a same-origin GET/HEAD
            return
        origin = origin.rstrip("/")
        if origin in self.origins:
            return
        host = conn.headers.get("host", "")
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc and parts.netloc == host:
            return
        raise Forbidden("requests from another site are not accepted", code="cross_origin")

    async def _refuse(
        self, exc: PhotoEnhanceError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if scope["type"] == "websocket":
            # Before accepting: the handshake is answered 403; the close code says why.
            await send({"type": "websocket.close", "code": 4000 + exc.status, "reason": exc.code})
            return
        response: Any = error_response(exc)
        await response(scope, receive, send)
