"""uvicorn settings Parley needs, shared by `parley serve` and the test servers."""

from __future__ import annotations

from typing import Any

from parley.config import Settings
from parley.ops.wsproto import ParleyWebSocketProtocol

WS_MAX_FRAME = 65_536  # §8: frames are at most 64 KiB; larger ones close with 1009
WS_PING_INTERVAL = 25.0  # §8: a ping every 25 s …
WS_PING_TIMEOUT = 50.0  # … and a connection that misses two is closed


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        # Parley writes its own access log without query strings (they may hold tokens).
        "access_log": False,
        # Per-message deflate keeps a compression context per socket (hundreds of KiB);
        # chat frames are small, so idle connections stay small without it.
        "ws_per_message_deflate": False,
        "ws_max_size": WS_MAX_FRAME,
        "ws_ping_interval": WS_PING_INTERVAL,
        "ws_ping_timeout": WS_PING_TIMEOUT,
        # uvicorn's websockets-sansio, plus writing a fan-out frame straight to the socket.
        "ws": ParleyWebSocketProtocol,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "timeout_graceful_shutdown": 10,
    }
