"""Domain errors of the service and the one place that maps every error to an HTTP answer.

Every error answer has the body ``{"error": "<message>"}``. Anything a client sent maps to 4xx;
only a defect in the service itself becomes a 500 (logged with its traceback, body without details).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "BadInput",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServiceError",
    "Unauthorized",
    "UnprocessableInput",
    "UnsupportedMediaType",
    "error_response",
    "install_error_handlers",
]

log = logging.getLogger("pathguard.service")


class ServiceError(Exception):
    """Base of the errors the service answers with a specific status."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadInput(ServiceError):
    """Malformed request: undecodable, empty or truncated image, bad tensor values or shape."""

    status_code = 400


class Unauthorized(ServiceError):
    """Missing or wrong API key."""

    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    """Unknown model name."""

    status_code = 404


class PayloadTooLarge(ServiceError):
    """Body, image pixel count or number of images over the configured limit."""

    status_code = 413


class UnsupportedMediaType(ServiceError):
    """Content type or image format outside the whitelist."""

    status_code = 415


class UnprocessableInput(ServiceError):
    """Well-formed input that does not fit the bundle's input spec under the configured policy."""

    status_code = 422


class NotReady(ServiceError):
    """The bundle is not loaded and warmed up yet (or the service is shutting down)."""

    status_code = 503

    def __init__(self, message: str = "service is not ready", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(NotReady):
    """The request queue is full."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The single error body shape."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(parts) or "invalid request"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status_code, exc.message, exc.headers())


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, message = _validation_message(exc)
    return error_response(status, message)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping domain error -> HTTP status on ``app``."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
