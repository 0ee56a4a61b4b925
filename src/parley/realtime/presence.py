"""Who is online and who is typing: in memory for one process, in Redis for many.

Presence counts live connections per user per process. Each process keeps a heartbeat
key with a TTL; a process that dies stops refreshing it, and its users count as offline
once it expires, without anyone having to clean up after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

log = structlog.get_logger("parley.presence")

PROCESS_TTL = 30  # s: a crashed process's users go offline after at most this long
PROCESS_REFRESH = 10  # s: well inside the TTL, so one slow refresh does not flap presence
TYPING_TTL = 6  # s: clients re-send every 3 s; two misses mean stopped (§6)


class PresenceStore(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def add(self, user_id: uuid.UUID) -> int: ...
    async def remove(self, user_id: uuid.UUID) -> int: ...
    async def count(self, user_id: uuid.UUID) -> int: ...
    async def online(self, user_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bool]: ...


class TypingStore(Protocol):
    async def set(self, conversation_id: uuid.UUID, user_id: uuid.UUID, typing: bool) -> None: ...
    async def who(self, conversation_id: uuid.UUID) -> list[uuid.UUID]: ...


class MemoryPresence:
    def __init__(self) -> None:
        self._counts: dict[uuid.UUID, int] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._counts.clear()

    async def add(self, user_id: uuid.UUID) -> int:
        self._counts[user_id] = self._counts.get(user_id, 0) + 1
        return self._counts[user_id]

    async def remove(self, user_id: uuid.UUID) -> int:
        left = self._counts.get(user_id, 0) - 1
        if left > 0:
            self._counts[user_id] = left
        else:
            self._counts.pop(user_id, None)
        return max(left, 0)

    async def count(self, user_id: uuid.UUID) -> int:
        return self._counts.get(user_id, 0)

    async def online(self, user_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bool]:
        return {u: self._counts.get(u, 0) > 0 for u in user_ids}


class MemoryTyping:
    def __init__(self) -> None:
        self._until: dict[uuid.UUID, dict[uuid.UUID, float]] = {}

    async def set(self, conversation_id: uuid.UUID, user_id: uuid.UUID, typing: bool) -> None:
        users = self._until.setdefault(conversation_id, {})
        if typing:
            users[user_id] = time.monotonic() + TYPING_TTL
        else:
            users.pop(user_id, None)
        if not users:
            self._until.pop(conversation_id, None)

    async def who(self, conversation_id: uuid.UUID) -> list[uuid.UUID]:
        now = time.monotonic()
        users = self._until.get(conversation_id, {})
        for user_id in [u for u, until in users.items() if until <= now]:
            del users[user_id]
        return sorted(users, key=str)


class RedisPresence:
    def __init__(self, client: Any, *, prefix: str, process: str) -> None:
        self._redis = client
        self._prefix = prefix
        self._process = process
        self._local: dict[uuid.UUID, int] = {}
        self._task: asyncio.Task[None] | None = None

    def _user_key(self, user_id: uuid.UUID) -> str:
        return f"{self._prefix}:pc:{user_id.hex}"

    def _process_key(self, process: str) -> str:
        return f"{self._prefix}:proc:{process}"

    async def start(self) -> None:
        await self._redis.set(self._process_key(self._process), "1", ex=PROCESS_TTL)
        self._task = asyncio.create_task(self._refresh_forever(), name="parley-presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id in self._local:
                    pipe.hdel(self._user_key(user_id), self._process)
                pipe.delete(self._process_key(self._process))
                await pipe.execute()
        self._local.clear()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(PROCESS_REFRESH)
            try:
                await self._redis.set(self._process_key(self._process), "1", ex=PROCESS_TTL)
                # Re-assert the local counts: Redis may have restarted empty.
                if self._local:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for user_id, n in self._local.items():
                            pipe.hset(self._user_key(user_id), self._process, n)
                        await pipe.execute()
            except Exception as exc:
                log.warning("presence_refresh_failed", error=type(exc).__name__)

    async def add(self, user_id: uuid.UUID) -> int:
        self._local[user_id] = self._local.get(user_id, 0) + 1
        await self._redis.hset(self._user_key(user_id), self._process, self._local[user_id])
        return await self.count(user_id)

    async def remove(self, user_id: uuid.UUID) -> int:
        left = self._local.get(user_id, 0) - 1
        if left > 0:
            self._local[user_id] = left
            await self._redis.hset(self._user_key(user_id), self._process, left)
        else:
            self._local.pop(user_id, None)
            await self._redis.hdel(self._user_key(user_id), self._process)
        return await self.count(user_id)

    async def count(self, user_id: uuid.UUID) -> int:
        return (await self._counts([user_id]))[user_id]

    async def online(self, user_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bool]:
        counts = await self._counts(user_ids)
        return {u: n > 0 for u, n in counts.items()}

    async def _counts(self, user_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.hgetall(self._user_key(user_id))
            per_user: list[dict[bytes, bytes]] = await pipe.execute()
        processes = sorted({p for entry in per_user for p in entry})
        alive: set[bytes] = set()
        if processes:
            async with self._redis.pipeline(transaction=False) as pipe:
                for process in processes:
                    pipe.exists(self._process_key(process.decode()))
                for process, exists in zip(processes, await pipe.execute(), strict=True):
                    if exists:
                        alive.add(process)
        return {
            user_id: sum(int(n) for p, n in entry.items() if p in alive)
            for user_id, entry in zip(user_ids, per_user, strict=True)
        }


class RedisTyping:
    def __init__(self, client: Any, *, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix

    def _key(self, conversation_id: uuid.UUID) -> str:
        return f"{self._prefix}:ty:{conversation_id.hex}"

    async def set(self, conversation_id: uuid.UUID, user_id: uuid.UUID, typing: bool) -> None:
        key = self._key(conversation_id)
        if typing:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {user_id.hex: time.time() + TYPING_TTL})
                pipe.expire(key, TYPING_TTL * 2)
                await pipe.execute()
        else:
            await self._redis.zrem(key, user_id.hex)

    async def who(self, conversation_id: uuid.UUID) -> list[uuid.UUID]:
        key = self._key(conversation_id)
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zrangebyscore(key, now, "+inf")
            _, members = await pipe.execute()
        return sorted((uuid.UUID(hex=m.decode()) for m in members), key=str)
