"""Logging: one JSON object per line in production, readable lines on a terminal.

Parley's own events go through structlog; the standard library's records (uvicorn's
lifecycle lines, its WebSocket handshake lines, libraries) are rendered by the same
processors, after a filter that blanks tokens and tickets in query strings.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from parley.ops.context import request_id_var, user_id_var

# `?token=…` / `&ticket=…` (and a few other credential names) in anything logged.
_SECRET_QUERY = re.compile(
    r"([?&](?:token|ticket|access_token|refresh_token|password)=)[^&\s\"']+", re.IGNORECASE
)


def redact(text: str) -> str:
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """uvicorn logs WebSocket handshakes with their full query string; never a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _add_context(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = request_id_var.get()
    if request_id and "request_id" not in event:
        event["request_id"] = request_id
    user_id = user_id_var.get()
    if user_id and "user_id" not in event:
        event["user_id"] = user_id
    return event


def configure_logging(fmt: str, level: str) -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        # uvicorn's own handlers (when it configured any) would print plain text.
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log prints query strings, which may hold tokens or tickets; Parley
    # writes its own access line instead and silences that logger.
    logging.getLogger("uvicorn.access").disabled = True
