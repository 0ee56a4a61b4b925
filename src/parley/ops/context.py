"""Per-request context shared by logging and error rendering."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("parley_request_id", default=None)
user_id_var: ContextVar[str | None] = ContextVar("parley_user_id", default=None)
