"""The exception hierarchy. Each error carries a stable ``code`` and its HTTP ``status``.

This module is the one place where errors meet status codes, and ``engine_error`` the one
place where an unexpected exception becomes what a caller sees; ``serve_app.api.errors``
turns any of them into the JSON error shape. Errors cross Ray process boundaries, so they
pickle by their constructor arguments.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

LOGGER = logging.getLogger(__name__)


class PhotoEnhanceError(Exception):
    """Base class: a user-facing error with a code, a message and an HTTP status."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.code, self.details))

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    def headers(self) -> dict[str, str]:
        return {}


def _rebuild(cls: type[PhotoEnhanceError], message: str, code: str, details: dict[str, Any]):
    return cls(message, code=code, **details)


class PayloadTooLarge(PhotoEnhanceError):
    status = 413
    default_code = "payload_too_large"


class TooManyPixels(PayloadTooLarge):
    default_code = "too_many_pixels"


class ImageTooComplex(PayloadTooLarge):
    """The container's structure (scans, strips, chunks, frames) passes a limit."""

    default_code = "image_too_complex"


class CodecBudgetExceeded(PayloadTooLarge):
    """Decoding or encoding passed its CPU-time or memory budget and was stopped."""

    default_code = "decode_too_costly"


class UnsupportedMediaType(PhotoEnhanceError):
    status = 415
    default_code = "unsupported_media_type"


class InvalidImage(PhotoEnhanceError):
    status = 422
    default_code = "invalid_image"


class InvalidOption(PhotoEnhanceError):
    status = 422
    default_code = "invalid_option"


class InvalidRequest(PhotoEnhanceError):
    status = 400
    default_code = "invalid_request"


class Unauthorized(PhotoEnhanceError):
    """No key, or not a valid one (when keys are on)."""

    status = 401
    default_code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="photoenhance"'}


class Forbidden(PhotoEnhanceError):
    """A valid key whose role may not do this (wrong owners get ``NotFound`` instead)."""

    status = 403
    default_code = "forbidden"


class TooManyRequests(PhotoEnhanceError):
    """A per-key or per-job limit; ``retry_after_s`` says when to try again."""

    status = 429
    default_code = "rate_limited"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.details.get("retry_after_s", 1))))}


class NotFound(PhotoEnhanceError):
    status = 404
    default_code = "not_found"


class Conflict(PhotoEnhanceError):
    status = 409
    default_code = "conflict"


class Overloaded(PhotoEnhanceError):
    status = 503
    default_code = "overloaded"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(int(self.details.get("retry_after_s", 1)))}


class NotReady(Overloaded):
    default_code = "not_ready"


class Abandoned(Overloaded):
    """Every caller of a batch has gone (its deadline passed, its client left): the batch's
    remaining device work is dropped. No caller receives it; the replica's metrics count it."""

    default_code = "abandoned"


class InsufficientStorage(PhotoEnhanceError):
    status = 507
    default_code = "insufficient_storage"


class ImageTooLargeForDevice(PhotoEnhanceError):
    """Even alone, at the smallest tile, the image does not fit the device's memory."""

    status = 413
    default_code = "too_large_for_device"


class EngineFailure(PhotoEnhanceError):
    status = 500
    default_code = "engine_error"


class WeightsError(PhotoEnhanceError):
    """Weights are missing, corrupt or fail their checksum (raised at start-up)."""

    status = 503
    default_code = "weights_unavailable"


def as_photo_error(exc: BaseException) -> PhotoEnhanceError | None:
    """The ``PhotoEnhanceError`` inside ``exc`` (Ray wraps remote errors), or None."""
    if isinstance(exc, PhotoEnhanceError):
        return exc
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, PhotoEnhanceError):
        return cause
    return None


# How allocators word running out: CUDA's caching allocator ("CUDA out of memory"), and the
# CPU allocator, whose RuntimeError says "can't allocate memory" (errno 12, ENOMEM).
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that did not fit: the image's size, not a bug."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(words in text for words in _OOM_WORDS)


def engine_error(exc: BaseException, context: str = "engine error") -> PhotoEnhanceError:
    """What an exception raised while enhancing an image becomes for the caller.

    Our own errors (also inside Ray's wrapper) pass unchanged. Running out of memory
    (``MemoryError``, which the engine's ``ItemTooLarge`` is, or a device allocator's "out of
    memory") is the image's size: 413. Anything else is a bug: logged here with its traceback
    under ``context``, and answered with a generic message that holds no exception text.
    """
    err = as_photo_error(exc)
    if err is not None:
        return err
    if is_out_of_memory(exc):
        return ImageTooLargeForDevice("the image does not fit the device's memory")
    LOGGER.error("%s", context, exc_info=exc)
    return EngineFailure("the engine failed on this image")
