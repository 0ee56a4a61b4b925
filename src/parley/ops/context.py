"""Per-request context shared by logging and error rendering."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("parley_request_id", default=None)
user_id_var: ContextVar[str | None] = ContextVar("parley_user_id", default=None)

# A client's X-Request-ID is kept if it is a sane token, else a fresh one is made.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def start_request(headers: dict[bytes, bytes]) -> str:
    """Set the context of a new request (or WebSocket) and return its request id."""
    incoming = headers.get(b"x-request-id", b"").decode("latin-1")
    request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
    request_id_var.set(request_id)
    user_id_var.set(None)
    return request_id
