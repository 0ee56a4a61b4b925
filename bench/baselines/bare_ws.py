"""The floor cost of WebSocket fan-out in Python: a bare broadcast server written with
the `websockets` library alone (no framework, no database, no broker).

Every text frame a client sends is broadcast, unchanged, to every client connected to
the same path (one path is one room; `/` for the single-room scenario). Same frame
settings as Parley (`parley.ops.server.uvicorn_options`): no per-message deflate, 64 KiB
frames, a ping every 25 s. Runs on uvloop, as `parley serve` does.

    python -m bench.baselines.bare_ws --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

ROOMS: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else "/"
    room = ROOMS.setdefault(path, set())
    room.add(ws)
    try:
        with contextlib.suppress(ConnectionClosed):
            while True:
                # decode=False: the bytes go out as they came in, as a text frame.
                message = await ws.recv(decode=False)
                broadcast(room, message, text=True)
    finally:
        room.discard(ws)


async def main(port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        max_size=65_536,
        ping_interval=25,
        ping_timeout=50,
        backlog=4096,
    ):
        await stop


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.port))


if __name__ == "__main__":
    cli()
