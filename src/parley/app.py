"""create_app(settings): routers, middleware and the lifespan of shared resources."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from parley import __version__
from parley.auth.endpoints import router as auth_router
from parley.auth.security import PasswordHasher
from parley.config import Settings
from parley.conversations.endpoints import router as conversations_router
from parley.db.session import Database
from parley.errors import error_responses, install_error_handlers
from parley.messages.endpoints import router as messages_router
from parley.ops.health import router as health_router
from parley.ops.logging import configure_logging
from parley.ops.metrics import router as metrics_router
from parley.ops.middleware import RequestContextMiddleware
from parley.ops.ratelimit import RateLimiter
from parley.ops.shutdown import install_drain
from parley.realtime.endpoints import router as realtime_router
from parley.realtime.gateway import serve_websocket
from parley.realtime.service import Realtime
from parley.realtime.sse import router as sse_router
from parley.users.endpoints import admin_router
from parley.users.endpoints import router as users_router

WEB_DIR = Path(__file__).resolve().parent / "web"
# Net new tracked objects between young collections (CPython: 700); see the lifespan.
GC_YOUNG_THRESHOLD = 50_000


class ParleyApp(FastAPI):
    """FastAPI, with the real-time gateway's WebSockets taken before the HTTP stack
    (parley.realtime.gateway.serve_websocket): a long-lived socket keeps no middleware
    frames alive."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and await serve_websocket(self, scope, receive, send):
            return
        await super().__call__(scope, receive, send)


def process_name() -> str:
    """How /admin/stats names this process among many."""
    return f"{socket.gethostname()}:{os.getpid()}"


def create_app(settings: Settings | None = None) -> ParleyApp:
    settings = settings or Settings()
    configure_logging(settings.effective_log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.db = Database(settings.effective_database_url, pool_size=settings.db_pool_size)
        app.state.realtime = Realtime(settings, app.state.db, process=app.state.process_name)
        app.state.shutting_down = False
        await app.state.realtime.start()
        undo_drain = install_drain(app, settings.shutdown_drain)
        # Everything alive now (modules, the app, pools) lives as long as the process:
        # moved out of the collector's view, a full collection under load walks a tenth
        # of the objects and pauses ~10 ms instead of ~100 ms (the p99 tail in bench/).
        gc.collect()
        gc.freeze()
        # Open sockets are long-lived too, and their objects are not frozen: with 1,000
        # of them a full collection walks ~110,000 objects and stops the event loop for
        # ~80 ms. At the default young threshold (700) a busy server promotes so many
        # objects that live a few milliseconds (messages in flight) that a full
        # collection came every ~5 s, and those pauses were the fan-out p99 (bench/).
        # Collecting the young generation less often lets them die first.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            app.state.shutting_down = True
            undo_drain()
            await app.state.realtime.stop()
            await app.state.rate_limiter.aclose()
            await app.state.db.dispose()

    docs_on = settings.docs == "on"
    app = ParleyApp(
        title="Parley",
        version=__version__,
        summary="Self-hostable real-time chat backend",
        lifespan=lifespan,
        docs_url="/docs" if docs_on else None,
        redoc_url="/redoc" if docs_on else None,
        openapi_url="/openapi.json" if docs_on else None,
    )
    app.state.settings = settings
    app.state.process_name = process_name()
    app.state.hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_cost
    )
    app.state.rate_limiter = RateLimiter(settings)
    install_error_handlers(app)

    # Routers carry the full /api/v1 path themselves so that a matched route knows its
    # whole template (metrics and logs label requests by it). No two routers' paths
    # overlap, and requests try the routes in order: the busiest come first.
    for router in (
        messages_router,
        conversations_router,
        auth_router,
        users_router,
        admin_router,
        realtime_router,
        sse_router,
    ):
        app.include_router(router, responses=error_responses(401, 404, 422, 500))
    app.include_router(health_router)
    app.include_router(metrics_router)

    @app.get("/", include_in_schema=False)
    async def web_client() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, max_upload_bytes=settings.max_upload_bytes)
    return app
