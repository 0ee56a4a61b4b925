"""Graceful shutdown on SIGTERM (§10).

A load balancer must see `/ready` go 503 before the process stops accepting, so SIGTERM
first marks the app as shutting down and only after a short drain hands the signal on to
uvicorn. uvicorn then stops listening, lets in-flight requests finish and closes
WebSockets with 1012 (service restart), so clients resume on another process.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog
from fastapi import FastAPI

log = structlog.get_logger("parley.shutdown")


def install_drain(app: FastAPI, drain_seconds: float) -> Callable[[], None]:
    """Wrap the SIGTERM handler (uvicorn's) with a drain; returns an undo function.

    Only the main thread may set signal handlers; elsewhere (an embedded server in
    tests) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: Any = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if app.state.shutting_down:
            return
        app.state.shutting_down = True
        log.info("draining", seconds=drain_seconds)

        def hand_on() -> None:
            if callable(previous):
                previous(signum, frame)
            else:
                raise SystemExit(0)

        loop.call_soon_threadsafe(loop.call_later, drain_seconds, hand_on)

    signal.signal(signal.SIGTERM, on_sigterm)

    def undo() -> None:
        signal.signal(signal.SIGTERM, previous)

    return undo
