"""The JSON error shape, built in one place: ``{"error": {"code": ..., "message": ...}}``.

Statuses come from ``serve_app.errors`` (each error carries its own); this module only turns
errors into responses and installs the Starlette handlers that do so.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve_app.errors import EngineFailure, PhotoEnhanceError, as_photo_error

LOGGER = logging.getLogger(__name__)


def error_payload(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def error_response(exc: PhotoEnhanceError, **beside: Any) -> JSONResponse:
    """``beside``: fields next to ``error`` (``/readyz`` adds the model's state)."""
    return JSONResponse(
        {"error": exc.to_dict(), **beside}, status_code=exc.status, headers=exc.headers() or None
    )


async def _photo_error(_: Request, exc: Exception) -> JSONResponse:
    err = as_photo_error(exc) or EngineFailure("internal error")
    return error_response(err)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
    return JSONResponse(error_payload(code, message), status_code=status, headers=exc.headers)


def internal_error_response() -> JSONResponse:
    """What an unexpected exception becomes: a generic message; details go to the log."""
    exc = EngineFailure("internal server error", code="internal_error")
    return error_response(exc)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Starlette's server-error middleware answers with this, then re-raises for the log
    # (``ObservedApp``); without it the answer would be its plain-text page.
    return internal_error_response()


EXCEPTION_HANDLERS = {
    PhotoEnhanceError: _photo_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
