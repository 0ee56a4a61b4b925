"""The floor cost of a persisted HTTP write in Python: a bare ASGI app (no framework)
whose POST /messages does one asyncpg INSERT and answers 201 with the row's id.

Its POST /send runs Parley's own send statement instead (SEND_SQL_POSITIONAL, the
statement a plain Parley send is), with the sender, session and room from the body: the
database work of a Parley send with no framework, no token, no validation and no
publish around it. Between the two, it tells how much of the gap to Parley the
database work alone makes.

Served by uvicorn with the same settings as `parley serve` (uvloop, httptools, no access
log), so the ratio Parley ÷ this isolates what Parley adds on top of the database write.
"""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import uvicorn

from parley.messages.repository import SEND_SQL_POSITIONAL

TABLE = """
CREATE TABLE IF NOT EXISTS bare_messages (
    id uuid PRIMARY KEY,
    conversation_id uuid NOT NULL,
    content text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = "INSERT INTO bare_messages (id, conversation_id, content) VALUES ($1, $2, $3)"


def make_app(dsn: str, pool_size: int) -> Any:
    pool: asyncpg.Pool | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal pool
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
                    async with pool.acquire() as conn:
                        await conn.execute(TABLE)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if pool is not None:
                        await pool.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":
            await _respond(send, 200, b'{"status":"ok"}')
            return
        data = orjson.loads(body)
        row_id = uuid.uuid4()
        assert pool is not None
        if scope["path"] == "/send":
            row = await pool.fetchrow(
                SEND_SQL_POSITIONAL,
                uuid.UUID(data["uid"]),
                uuid.UUID(data["sid"]),
                uuid.UUID(data["cid"]),
                row_id,
                data["content"],
                None,
                None,
                datetime.now(UTC),
            )
            # Anything but a stored message counts as an error to the load generator.
            if row is None or row["seq"] is None:
                await _respond(send, 409, b'{"stored":false}')
                return
            await _respond(send, 201, orjson.dumps({"id": str(row_id), "seq": row["seq"]}))
            return
        await pool.execute(INSERT, row_id, uuid.UUID(data["conversation_id"]), data["content"])
        await _respond(send, 201, orjson.dumps({"id": str(row_id)}))

    return app


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.dsn, args.pool_size),
        host="127.0.0.1",
        port=args.port,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
