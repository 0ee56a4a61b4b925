"""Presence across processes (Redis): a process that dies without cleaning up stops
counting once its heartbeat expires, and what it left behind is cleared by the next
read. Runs with the PostgreSQL + Redis backend only: the embedded mode has one process
and keeps presence in memory."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi import FastAPI

from tests.conftest import PG_URL, User
from tests.test_ws_features import presence_of

pytestmark = [
    pytest.mark.skipif(not PG_URL, reason="needs PARLEY_TEST_DATABASE_URL (PostgreSQL)"),
    pytest.mark.parametrize("backend", ["postgres"], indirect=True),
]

DEAD = "gone-host:4242"


async def test_a_dead_process_counts_for_nobody_and_its_entries_are_cleared(
    app: FastAPI, alice: User, bob: User, group: dict[str, Any]
) -> None:
    realtime = app.state.realtime
    redis, prefix = realtime.redis, app.state.settings.redis_prefix
    key = f"{prefix}:pc:{uuid.UUID(bob.id).hex}"
    # What a process killed while bob was connected to it leaves: its count for bob,
    # and no heartbeat key (it expired).
    await redis.hset(key, DEAD, 2)
    assert not await redis.exists(f"{prefix}:proc:{DEAD}")

    assert await presence_of(alice, bob.id) == {bob.id: "offline"}
    assert await redis.hgetall(key) == {}

    # A live process's entry stays beside a dead one's, and counts.
    await redis.hset(key, DEAD, 1)
    assert await realtime.presence.add(uuid.UUID(bob.id)) == 1
    assert await presence_of(alice, bob.id) == {bob.id: "online"}
    assert await redis.hgetall(key) == {app.state.process_name.encode(): b"1"}
    assert await realtime.presence.remove(uuid.UUID(bob.id)) == 0
    assert await presence_of(alice, bob.id) == {bob.id: "offline"}
