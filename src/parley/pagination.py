"""Opaque cursors and the shared `limit` parameter."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import orjson
from fastapi import Query

from parley.errors import ParleyError

DEFAULT_PAGE = 50
MAX_PAGE = 100  # §2: a page is 1..100 items; larger lists are paged, never returned whole.
MAX_CURSOR_CHARS = 512

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size, 1..100")]
Cursor = Annotated[
    str | None, Query(max_length=MAX_CURSOR_CHARS, description="Opaque cursor from next_cursor")
]


class InvalidCursor(ParleyError):
    status = 422
    code = "invalid_cursor"

    def __init__(self) -> None:
        super().__init__("The cursor is not one this list gave out")


def encode_cursor(*key: Any) -> str:
    raw = orjson.dumps([str(part) if not isinstance(part, int | str) else part for part in key])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = orjson.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise InvalidCursor() from exc
    if not isinstance(value, list) or len(value) != arity:
        raise InvalidCursor()
    return value
