"""A small HTTP client of the PhotoEnhance API (used by ``photoenhance enhance``).

    from serve_app.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.enhance(open("in.jpg", "rb").read(), upscale=2)
        open(f"out.{result.format}", "wb").write(result.data)

An API key (servers with keys on) comes from ``api_key=`` or ``$PHOTOENHANCE_API_KEY``.
Answers of ``503`` (queue full, not ready) and dropped connections are retried with
backoff, honouring ``Retry-After``; other errors raise ``ApiError`` at once.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from serve_app.api.schemas import EnhancedImage

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "PHOTOENHANCE_API_KEY"
_RETRY_STATUSES = {502, 503, 504}


class ApiError(Exception):
    """An error answer: HTTP status, the API's error code and message."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status in _RETRY_STATUSES
    return isinstance(exc, httpx.TransportError)


class _Wait:
    """Exponential backoff with jitter, but never less than the server's Retry-After."""

    def __init__(self, max_s: float) -> None:
        self._backoff = wait_exponential_jitter(initial=0.5, max=max_s)
        self._max = max_s

    def __call__(self, state: RetryCallState) -> float:
        wait = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after:
            wait = max(wait, min(exc.retry_after, self._max))
        return wait


def parse_server_timing(value: str) -> dict[str, float]:
    """``Server-Timing`` back into seconds per stage."""
    out: dict[str, float] = {}
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, val = param.strip().partition("=")
            if key == "dur" and name:
                with contextlib.suppress(ValueError):
                    out[name] = float(val) / 1000.0
    return out


def parse_boxes(value: str) -> tuple[tuple[int, int, int, int], ...]:
    """The boxes of an ``X-Face-Boxes`` value (``api.schemas.format_boxes`` writes it)."""
    out = []
    for part in value.split():
        values = part.split(",")
        if len(values) == 4 and all(v.removeprefix("-").isdigit() for v in values):
            out.append(tuple(int(v) for v in values))  # anything else: not ours, skipped
    return tuple(out)


def _error(response: httpx.Response) -> ApiError:
    code, message = "http_error", response.text[:500] or response.reason_phrase
    try:
        body = response.json()["error"]
        code, message = body["code"], body["message"]
    except (ValueError, KeyError, TypeError):
        pass
    retry_after = response.headers.get("retry-after")
    try:
        after = float(retry_after) if retry_after else None
    except ValueError:
        after = None
    return ApiError(response.status_code, code, message, after)


class Client:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 600.0,
        retries: int = 5,
        max_backoff_s: float = 30.0,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = auth_headers(api_key)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        self._retries = retries
        self._max_backoff = max_backoff_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        def once() -> httpx.Response:
            response = self._http.request(method, path, **kwargs)
            if response.status_code >= 400:
                raise _error(response)
            return response

        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self._retries + 1),
            wait=_Wait(self._max_backoff),
            reraise=True,
        )
        return retrying(once)

    def enhance(
        self, data: bytes, *, filename: str | None = None, **options: Any
    ) -> EnhancedImage:
        """Enhance one image; ``options`` use the API's names (``upscale=2``, ``face=False``)."""
        params = {k: _param(v) for k, v in options.items() if v is not None}
        content_type = (mimetypes.guess_type(filename)[0] if filename else None) or (
            "application/octet-stream"
        )
        response = self._request(
            "POST", "/v1/enhance", params=params, content=data,
            headers={"content-type": content_type},
        )
        headers = response.headers
        media_type = headers.get("content-type", "application/octet-stream").split(";")[0]
        return EnhancedImage(
            data=response.content,
            media_type=media_type,
            format={"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp"}.get(
                media_type, media_type.rpartition("/")[2]
            ),
            width=int(headers.get("x-image-width", 0)),
            height=int(headers.get("x-image-height", 0)),
            faces=int(headers.get("x-faces-restored", 0)),
            face_boxes=parse_boxes(headers.get("x-face-boxes", "")),
            timings=parse_server_timing(headers.get("server-timing", "")),
            synthetic=headers.get("x-weights-synthetic") == "true",
        )

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models").json()

    def ready(self) -> dict[str, Any]:
        return self._request("GET", "/readyz").json()

    def presets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/presets").json()["presets"]

    def save_preset(self, name: str, **options: Any) -> dict[str, Any]:
        return self._request("PUT", f"/v1/presets/{name}", json=options).json()

    def delete_preset(self, name: str) -> None:
        self._request("DELETE", f"/v1/presets/{name}")


def wait_ready(url: str, timeout_s: float = 300.0, *, alive: Callable[[], bool] | None = None,
               every_s: float = 0.5) -> float:
    """Poll ``GET {url}/readyz`` until it answers 200; the seconds waited.

    For scripts and tests that start a server: ``alive`` (say, ``lambda: proc.poll() is None``)
    ends the wait with ``RuntimeError`` as soon as the server's process is gone; past
    ``timeout_s`` it is ``TimeoutError``. A server's first answers may be refused
    connections or 503s while Serve starts its proxy and replicas: both are waited through.
    """
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=30).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if alive is not None and not alive():
            raise RuntimeError(f"the server of {url} exited before it was ready")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{url} was not ready in {timeout_s:.0f} s")
        time.sleep(every_s)


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """``Authorization`` for ``api_key``, else ``$PHOTOENHANCE_API_KEY``; none when unset."""
    key = api_key or os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
