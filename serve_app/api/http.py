"""Reading requests: bodies limited while they stream, images from raw or multipart bodies,
options from the query string, form fields and JSON; and the outermost middleware that
counts requests and turns unexpected exceptions into a logged, generic 500.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api import metrics
from serve_app.api.errors import internal_error_response
from serve_app.config import LimitsConfig
from serve_app.errors import InvalidOption, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from serve_app.options import EnhanceOptions

LOGGER = logging.getLogger(__name__)

OPTION_NAMES: frozenset[str] = frozenset(EnhanceOptions.model_fields)
IMAGE_FIELD = "image"
# Room for the multipart envelope and option fields around the image itself.
MULTIPART_OVERHEAD = 256 * 1024
_REFUSED_TYPES = ("image/svg+xml", "text/html", "application/xhtml+xml", "image/gif")


@dataclass
class ImageRequest:
    data: bytes
    options: dict[str, Any]


# --------------------------------------------------------------------------- bodies


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    if size > limit:
        raise PayloadTooLarge(
            f"body is {size} bytes; the limit is {limit}", max_bytes=limit
        )


def limit_body(request: Request, limit: int) -> Request:
    """A request whose body raises ``PayloadTooLarge`` once ``limit`` bytes have streamed.

    The declared ``Content-Length`` is checked first, so honest clients are refused before
    a byte is read; chunked or lying ones are cut off while streaming.
    """
    _check_declared_length(request, limit)
    received = 0
    upstream = request.receive

    async def receive() -> Message:
        nonlocal received
        message = await upstream()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(
                    f"body exceeds the limit of {limit} bytes", max_bytes=limit
                )
        return message

    return Request(request.scope, receive)


async def read_body(request: Request, limit: int) -> bytes:
    chunks = []
    async for chunk in limit_body(request, limit).stream():
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int = 64 * 1024) -> Any:
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}", code="invalid_json") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_image_request(request: Request, limits: LimitsConfig) -> ImageRequest:
    """The image bytes and raw options of ``POST /v1/enhance``.

    Multipart: file (or field) ``image``, options as fields or a JSON ``options`` field.
    Anything else: the raw body is the image (its type is sniffed, not trusted).
    Query-string options apply in both cases; body fields win over the query.
    """
    options = parse_option_sources(request.query_params)
    media_type = _media_type(request)
    if media_type in _REFUSED_TYPES:
        raise UnsupportedMediaType(
            f"{media_type} is not supported; send JPEG, PNG, WebP, BMP or TIFF"
        )
    if media_type != "multipart/form-data":
        return ImageRequest(await read_body(request, limits.max_bytes), options)

    limited = limit_body(request, limits.max_bytes + MULTIPART_OVERHEAD)
    form = await limited.form(max_files=1, max_fields=len(OPTION_NAMES) + 4)
    try:
        item = form.get(IMAGE_FIELD)
        if item is None:
            raise InvalidRequest(
                f"multipart body has no {IMAGE_FIELD!r} field", code="missing_image"
            )
        if not isinstance(item, UploadFile):
            raise InvalidRequest(
                f"send {IMAGE_FIELD!r} as a file part (with a filename)", code="missing_image"
            )
        if (item.size or 0) > limits.max_bytes:
            raise PayloadTooLarge(
                f"image is {item.size} bytes; the limit is {limits.max_bytes}",
                max_bytes=limits.max_bytes,
            )
        data = await item.read()
        fields = {k: v for k, v in form.multi_items() if k != IMAGE_FIELD and isinstance(v, str)}
        options.update(parse_option_sources(fields))
    finally:
        await form.close()
    return ImageRequest(data, options)


# --------------------------------------------------------------------------- options


def parse_option_sources(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """Merge option mappings (later wins); an ``options`` entry may hold a JSON object.

    Unknown names are refused (422) rather than silently ignored.
    """
    out: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if key == "options":
                out.update(_json_options(value))
            elif key in OPTION_NAMES:
                out[key] = value
            else:
                raise InvalidOption(
                    f"unknown option {key!r}; known: {sorted(OPTION_NAMES)}", field=key
                )
    return out


def _json_options(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise InvalidOption(f"options is not valid JSON: {exc}", field="options") from None
    if not isinstance(value, Mapping):
        raise InvalidOption("options must be a JSON object", field="options")
    return parse_option_sources(value)


# --------------------------------------------------------------------------- middleware


class ObservedApp:
    """Outermost ASGI middleware: request metrics, and a last-resort 500 for bugs.

    Starlette's own server-error middleware re-raises after answering; inside a Serve
    replica that would be logged twice, so unexpected errors stop here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            LOGGER.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            status = 500
            if not started:
                await internal_error_response()(scope, receive, send)
        finally:
            metrics.IN_FLIGHT.dec()
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            metrics.observe_request(name, status, time.perf_counter() - start)
