"""Presence across processes (Redis): a process that dies without cleaning up stops
counting once its heartbeat expires, what it left behind is cleared, and the people who
share a conversation with its users hear that they went offline. Runs with the
PostgreSQL + Redis backend only: the embedded mode has one process and keeps presence
in memory."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from fastapi import FastAPI

from parley.realtime.presence import RedisPresence
from tests.conftest import PG_URL, LiveServer, User
from tests.test_ws_features import news, open_ws, presence_of

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


async def test_the_users_of_a_dead_process_are_announced_offline(
    app: FastAPI, live: LiveServer, alice: User, bob: User, group: dict[str, Any]
) -> None:
    realtime = app.state.realtime
    redis, prefix = realtime.redis, app.state.settings.redis_prefix
    a = await open_ws(live, alice)
    event, _ = await a.until("presence")
    assert event == {"type": "presence", "user_id": alice.id, "status": "online"}
    # Another process serves bob, and a second device of alice's.
    other = RedisPresence(redis, prefix=prefix, process=DEAD)
    await other.start()
    assert await other.add(uuid.UUID(bob.id)) == 1
    assert await other.add(uuid.UUID(alice.id)) == 2
    assert await presence_of(alice, bob.id) == {bob.id: "online"}

    # It is killed: nothing cleans up after it, and its heartbeat expires.
    await redis.delete(f"{prefix}:proc:{DEAD}")
    # This process's next refresh (every few seconds on its own) finds it dead.
    await realtime.refresh_presence()
    event, before = await a.until("presence")
    assert news(before) == []
    assert event == {"type": "presence", "user_id": bob.id, "status": "offline"}
    # Alice is still connected here: no news about her, and none twice about bob.
    await realtime.refresh_presence()
    assert await a.quiet() == []
    assert await presence_of(alice, bob.id, alice.id) == {bob.id: "offline", alice.id: "online"}
    # Nothing of the dead process is left in Redis.
    assert [k async for k in redis.scan_iter(match=f"{prefix}:*{DEAD}*")] == []
    assert await redis.hgetall(f"{prefix}:pc:{uuid.UUID(bob.id).hex}") == {}
    assert DEAD.encode() not in await redis.smembers(f"{prefix}:procs")


async def test_one_live_process_reaps_a_dead_one_and_a_late_one_comes_back(
    app: FastAPI,
) -> None:
    # A prefix of its own, so that the app's own refresh cannot reap first.
    redis, prefix = app.state.realtime.redis, f"{app.state.settings.redis_prefix}-reap"
    live1, live2, dead = (
        RedisPresence(redis, prefix=prefix, process=name) for name in ("p1", "p2", DEAD)
    )
    user, elsewhere = uuid.uuid4(), uuid.uuid4()
    try:
        for store in (live1, live2, dead):
            await store.start()
        await dead.add(user)
        await dead.add(elsewhere)
        await live2.add(elsewhere)
        await redis.delete(f"{prefix}:proc:{DEAD}")

        # Both find it dead at once; one of them reaps it and tells of the user it
        # served alone.
        first, second = await asyncio.gather(live1.refresh(), live2.refresh())
        assert sorted([first.offline, second.offline], key=len) == [[], [user]]
        assert first.online == second.online == []
        assert await live1.count(user) == 0
        assert await live1.count(elsewhere) == 1

        # It was only late: its next refresh counts its users again and says who are
        # back, since they were announced offline meanwhile.
        back = await dead.refresh()
        assert sorted(back.online, key=str) == sorted([user, elsewhere], key=str)
        assert back.offline == []
        assert await live1.count(user) == 1
        assert await live1.count(elsewhere) == 2
        assert (await dead.refresh()).online == []
    finally:
        for store in (live1, live2, dead):
            await store.stop()
    assert [k async for k in redis.scan_iter(match=f"{prefix}:*")] == []
