"""Pure ASGI middleware: request ids, the access log and the request body limit.

Pure ASGI rather than BaseHTTPMiddleware so that WebSocket and streaming responses pass
through untouched and no extra task is spawned per request.
"""

from __future__ import annotations

import time

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parley.errors import problem_response
from parley.ops.context import start_request
from parley.ops.metrics import observe_request

access_log = structlog.get_logger("parley.access")

# JSON bodies of this API are small; uploads (multipart) have their own, larger limit.
MAX_JSON_BODY_BYTES = 1_048_576


class _BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = start_request(headers)
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        content_type = headers.get(b"content-type", b"").decode("latin-1")
        limit = (
            # Multipart framing adds a little to the file itself.
            self.max_upload_bytes + 65_536
            if content_type.startswith("multipart/")
            else MAX_JSON_BODY_BYTES
        )
        declared = headers.get(b"content-length")
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _BodyTooLarge
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            response = problem_response(
                413, "payload_too_large", f"The request body is larger than {limit} bytes"
            )
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None)
            # Unmatched paths share one label so that scanners cannot blow up the series.
            observe_request(scope["method"], route or "<unmatched>", status, elapsed)
            access_log.info(
                "request",
                method=scope["method"],
                # The path only: query strings may carry tokens or tickets.
                path=scope.get("path"),
                route=route,
                status=status,
                latency_ms=round(elapsed * 1000, 2),
            )
