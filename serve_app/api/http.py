"""Reading requests: bodies limited while they stream, images from raw or multipart bodies,
options from the query string, form fields and JSON; and the outermost middleware that
counts requests and turns unexpected exceptions into a logged, generic 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api import metrics
from serve_app.api.errors import internal_error_response
from serve_app.config import MULTIPART_OVERHEAD, LimitsConfig
from serve_app.errors import InvalidOption, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from serve_app.options import EnhanceOptions

LOGGER = logging.getLogger(__name__)

OPTION_NAMES: frozenset[str] = frozenset(EnhanceOptions.model_fields)
IMAGE_FIELD = "image"
# Room for the multipart envelope and option fields around the image itself.
# Lists and objects inside lists and objects: a jobs body needs 3; 8 leaves room.
MAX_JSON_DEPTH = 8
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


async def read_json_body(
    request: Request, limit: int = 64 * 1024, *, max_values: int | None = None,
    advice: str = "", too_many: str = "too_many_values",
) -> Any:
    """The JSON body, which must be sent as ``application/json`` (a cross-site page cannot
    send that type without a CORS preflight) and nest at most ``MAX_JSON_DEPTH`` deep.

    At most ``limit`` bytes (413 ``payload_too_large``) and ``max_values`` values (413
    ``too_many``), counted on the bytes before any Python object is built: a parsed JSON
    value costs up to 70 times its bytes (``[],`` is a 72-byte list per 3 bytes).
    ``advice`` ends either message (what to send instead).
    """
    if _media_type(request) != "application/json":
        raise UnsupportedMediaType(
            "send the body as JSON with 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    body = bytearray()  # json.loads takes it as it is: no joined copy of the chunks
    try:
        async for chunk in limit_body(request, limit).stream():
            body += chunk
    except PayloadTooLarge as exc:
        raise PayloadTooLarge(f"{exc.message}{advice}", max_bytes=limit) from None
    if not body.strip():
        return {}
    if max_values is not None and count_json_values(body, max_values) > max_values:
        raise PayloadTooLarge(
            f"the body holds more than {max_values} JSON values{advice}",
            code=too_many, max_values=max_values,
        )
    return loads(body, "body")


# A JSON string (escapes included; possessive, so linear even when one never ends), or a
# comma or an opening bracket.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[,\[{]', re.DOTALL)


def count_json_values(body: bytes | bytearray, stop: int) -> int:
    """An upper bound of the values and object members in a JSON text, from its bytes
    alone, exact up to ``stop`` (past it, some number above ``stop``).

    Every element or member but the first of its container follows a comma, so: commas +
    containers + 1 (exact but for empty containers). Counted at C speed over the whole body
    first; only when that passes ``stop`` (commas inside strings count there too) are the
    strings skipped, token by token, stopping at ``stop``: the work is bounded by the limit,
    not by the body.
    """
    count = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    if count <= stop:
        return count
    count = 1
    for token in _JSON_TOKEN.finditer(body):
        if body[token.start()] != ord('"'):
            count += 1
            if count > stop:
                break
    return count


def loads(text: str | bytes, what: str) -> Any:
    """``json.loads`` refusing deep nesting (400 ``json_too_deep``) and bad JSON (400)."""
    try:
        value = json.loads(text)
    except RecursionError:  # deeper than the parser's recursion limit
        value = _TOO_DEEP
    except ValueError as exc:  # also: integers past Python's digit limit
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", code="invalid_json") from None
    if value is _TOO_DEEP or _depth(value) > MAX_JSON_DEPTH:
        raise InvalidRequest(
            f"{what} nests deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
        )
    return value


_TOO_DEEP = object()


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            break
        # Containers only: a tuple per scalar cost 64 bytes each (1 GB for a 63 MiB body).
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return deepest


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

    check_multipart_boundary(request.headers.get("content-type", ""))
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


# RFC 2046 section 5.1.1: 1-70 of these characters, the last not a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")


def check_multipart_boundary(content_type: str) -> None:
    """400 ``bad_request`` unless the multipart boundary is one RFC 2046 allows (the
    multipart parser refuses some others, past 256 characters, with an error of its own)."""
    _, params = parse_options_header(content_type)
    if not _BOUNDARY.match(params.get(b"boundary", b"")):
        raise InvalidRequest(
            "the multipart boundary must be 1 to 70 characters of RFC 2046's set",
            code="bad_request",
        )


class ItemIndex(Convertor[int]):
    """``{index:item_index}``: an item's index in a path, parsed with a bounded check.

    Starlette's ``int`` convertor calls ``int()`` on any run of digits, and 5000 of them pass
    Python's int-string limit (ValueError, a 500). More than 10 significant digits is past
    any job's list: it becomes 2**31, answered (404) as any index past the list.
    """

    regex = "[0-9]+"
    PAST_ANY_LIST = 1 << 31

    def convert(self, value: str) -> int:
        digits = value.lstrip("0")
        return int(digits or "0") if len(digits) <= 10 else self.PAST_ANY_LIST

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("item_index", ItemIndex())


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
            value = loads(value, "options") if value.strip() else {}
        except InvalidRequest as exc:  # a bad option (422), not a bad request body
            code = exc.code if exc.code == "json_too_deep" else None
            raise InvalidOption(exc.message, code=code, field="options") from None
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
        except asyncio.CancelledError:
            if not started:
                status = 499  # the client went away first: not a server error
            raise
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


class DrainBody:
    """Lets a client that sends its whole body before reading (Python's urllib, many
    scripts) read an early answer (413, 401, 415, ...) instead of a connection reset.

    When a response ends while the request body is still arriving, the response's bytes go
    out first; then the rest of the body is read and discarded, at most ``max_bytes`` or
    ``timeout_s``, and only then is the response ended (and the connection closed or kept).
    Clients that read while sending see the answer at once.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        done = False

        async def tracked_receive() -> Message:
            nonlocal done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                done = True
            return message

        async def draining_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False) \
                    and not done:
                if message.get("body"):
                    await send({**message, "more_body": True})
                await self._drain(tracked_receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracked_receive, draining_send)

    async def _drain(self, receive: Receive) -> None:
        drained = 0

        async def discard() -> None:
            nonlocal drained
            while drained <= self.max_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(discard(), self.timeout_s)
        except TimeoutError:
            LOGGER.info("stopped draining an unread request body after %.0fs", self.timeout_s)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            return True
        if name == b"content-length" and value.strip() not in (b"", b"0"):
            return True
    return False
