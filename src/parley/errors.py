"""One exception base with a status and a stable code, rendered as RFC 9457 problem+json."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from parley.ops.context import request_id_var

log = structlog.get_logger("parley.errors")

PROBLEM_TYPE_BASE = "https://parley.dev/problems/"


class ParleyError(Exception):
    status: int = 400
    code: str = "bad_request"
    title: str | None = None

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None):
        self.detail = detail or self.default_detail()
        self.headers = headers
        super().__init__(self.detail)

    def default_detail(self) -> str:
        return HTTPStatus(self.status).phrase


class NotFound(ParleyError):
    status = 404
    code = "not_found"


class Unauthorized(ParleyError):
    status = 401
    code = "unauthorized"

    def __init__(self, detail: str | None = None):
        super().__init__(
            detail or "Authentication required", headers={"WWW-Authenticate": "Bearer"}
        )


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"


class TokenExpired(Unauthorized):
    code = "token_expired"


class Forbidden(ParleyError):
    status = 403
    code = "forbidden"


class Conflict(ParleyError):
    status = 409
    code = "conflict"


class Unprocessable(ParleyError):
    status = 422
    code = "validation_error"

    def __init__(self, detail: str | None = None, *, errors: list[dict[str, Any]] | None = None):
        self.errors = errors or []
        super().__init__(detail)


def invalid_field(
    field: str,
    msg: str,
    *,
    detail: str,
    type_: str = "value_error",
    source: str = "body",
) -> Unprocessable:
    """A 422 about one input field, shaped like FastAPI's own validation errors."""
    return Unprocessable(detail, errors=[{"loc": [source, field], "msg": msg, "type": type_}])


class MalformedJSON(ParleyError):
    status = 400
    code = "malformed_json"

    def __init__(self) -> None:
        super().__init__("The request body is not valid JSON")


class PayloadTooLarge(ParleyError):
    status = 413
    code = "payload_too_large"


class RateLimited(ParleyError):
    status = 429
    code = "rate_limited"

    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(
            f"Too many requests; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class Problem(BaseModel):
    """The body of every error response."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = None


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id_var.get(),
    }
    if errors is not None:
        body["errors"] = errors
    if body["request_id"]:
        # Also set here because a 500 is rendered outside the request-id middleware.
        headers = {**(headers or {}), "X-Request-ID": body["request_id"]}
    return JSONResponse(
        body, status_code=status, headers=headers, media_type="application/problem+json"
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    cleaned = []
    for err in errors:
        # `input` may echo a password back; `ctx` may hold exception objects that do not
        # serialize. Neither helps a client more than loc + msg + type.
        cleaned.append(
            {
                "loc": [str(part) for part in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return cleaned


async def _parley_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ParleyError)
    errors = exc.errors if isinstance(exc, Unprocessable) else None
    return problem_response(
        exc.status, exc.code, exc.detail, title=exc.title, errors=errors, headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_errors(exc.errors())
    if any(err["type"] == "json_invalid" for err in errors):
        return await _parley_error(request, MalformedJSON())
    return problem_response(422, "validation_error", "The request did not validate", errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = "No such resource"
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(exc.status_code, code, detail, headers=headers)


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", path=request.url.path)
    return problem_response(500, "internal_error", "An unexpected error occurred")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ParleyError, _parley_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json responses an operation may give."""
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {"application/problem+json": {}},
        }
        for status in statuses
    }
