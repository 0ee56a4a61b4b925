"""Who is online and who is typing: in memory for one process, in Redis for many.

Presence counts live connections per user per process. Each process keeps a heartbeat
key with a TTL; a process that dies stops refreshing it, and its users count as offline
once it expires. The live processes' refreshes then find it dead: one of them clears what
it left and tells who went offline with it (Realtime.refresh_presence).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

log = structlog.get_logger("parley.presence")

TYPING_TTL = 6  # s: clients re-send every 3 s; two misses mean stopped (§6)


@dataclass(frozen=True, slots=True)
class PresenceChanges:
    """What a refresh learned that the people around these users must hear."""

    # Served by a process that died, and connected nowhere else now.
    offline: list[uuid.UUID] = field(default_factory=list)
    # This process's users, whom another process took for offline while this one was
    # late with its heartbeat.
    online: list[uuid.UUID] = field(default_factory=list)


class PresenceStore(Protocol):
    refresh_interval: float

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def refresh(self) -> PresenceChanges: ...
    async def add(self, user_id: uuid.UUID) -> int: ...
    async def remove(self, user_id: uuid.UUID) -> int: ...
    async def count(self, user_id: uuid.UUID) -> int: ...
    async def online(self, user_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bool]: ...
    async def processes(self) -> dict[str, int]: ...


class TypingStore(Protocol):
    async def set(self, conversation_id: uuid.UUID, user_id: uuid.UUID, typing: bool) -> None: ...
    async def who(self, conversation_id: uuid.UUID) -> list[uuid.UUID]: ...


class MemoryPresence:
    refresh_interval = 10.0

    def __init__(self, *, process: str) -> None:
        self._process = process
        self._counts: dict[uuid.UUID, int] = {}

    async def processes(self) -> dict[str, int]:
        return {self._process: sum(self._counts.values())}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._counts.clear()

    async def refresh(self) -> PresenceChanges:
        # One process: no other can die, nor take this one for dead.
        return PresenceChanges()

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
        self._next_sweep = 0.0

    async def set(self, conversation_id: uuid.UUID, user_id: uuid.UUID, typing: bool) -> None:
        now = time.monotonic()
        users = self._until.setdefault(conversation_id, {})
        if typing:
            users[user_id] = now + TYPING_TTL
        else:
            users.pop(user_id, None)
        if not users:
            self._until.pop(conversation_id, None)
        self._sweep(now)

    async def who(self, conversation_id: uuid.UUID) -> list[uuid.UUID]:
        self._expire(conversation_id, time.monotonic())
        return sorted(self._until.get(conversation_id, {}), key=str)

    def _expire(self, conversation_id: uuid.UUID, now: float) -> None:
        users = self._until.get(conversation_id)
        if users is None:
            return
        for user_id in [u for u, until in users.items() if until <= now]:
            del users[user_id]
        if not users:
            del self._until[conversation_id]

    def _sweep(self, now: float) -> None:
        """Forget everyone who stopped without saying so. Typists nobody asks about would
        otherwise stay in memory for the life of the process; once per TTL is enough."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + TYPING_TTL
        for conversation_id in list(self._until):
            self._expire(conversation_id, now)


class RedisPresence:
    """Per user, a hash of process → live connections there; a user is online while any
    live process counts a connection. Beside it, the set of processes, and per process
    the set of users it counts: what a live process needs to clean up after a dead one.

    This process's writes are absolute counts, made one at a time under a lock, each in a
    MULTI with the read of the hash: two connects (or disconnects) of one user racing on
    two pooled Redis connections could otherwise land in the wrong order, leaving a stale
    count (online for ever) and telling both, or neither, that they were the first or
    the last — the online/offline announcements depend on exactly that.
    """

    def __init__(self, client: Any, *, prefix: str, process: str, ttl: int = 30) -> None:
        self._redis = client
        self._prefix = prefix
        self._process = process
        # A crashed process's users go offline at most this long (plus one refresh)
        # after it died.
        self._ttl = ttl
        # Well inside the TTL, so that one slow refresh does not flap presence.
        self.refresh_interval = max(ttl / 3, 1.0)
        self._local: dict[uuid.UUID, int] = {}
        # Users whose last write may not have reached Redis: the refresh writes them again.
        self._dirty: set[uuid.UUID] = set()
        self._lock = asyncio.Lock()

    def _user_key(self, user_id: uuid.UUID) -> str:
        return f"{self._prefix}:pc:{user_id.hex}"

    def _process_key(self, process: str) -> str:
        return f"{self._prefix}:proc:{process}"

    def _users_key(self, process: str) -> str:
        return f"{self._prefix}:pu:{process}"

    @property
    def _processes_key(self) -> str:
        return f"{self._prefix}:procs"

    async def start(self) -> None:
        await self._announce_process(register=True)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id in self._local:
                    pipe.hdel(self._user_key(user_id), self._process)
                pipe.delete(self._process_key(self._process), self._users_key(self._process))
                pipe.srem(self._processes_key, self._process)
                await pipe.execute()
        self._local.clear()

    async def refresh(self) -> PresenceChanges:
        """The heartbeat, this process's counts asserted again (Redis may have restarted
        empty, or a write may have failed), and the processes found dead cleaned up
        after. Run every `refresh_interval` seconds."""
        returned = await self._announce_process(register=True)
        async with self._lock:
            users = set(self._local) | self._dirty
            if users:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for user_id in users:
                        self._queue_write(pipe, user_id)
                    await pipe.execute()
            self._dirty.clear()
            # Not in the set of processes: another one reaped this one, late with its
            # heartbeat, and announced its users offline.
            back = sorted(self._local, key=str) if returned else []
        return PresenceChanges(offline=await self._reap(), online=back)

    async def _announce_process(self, *, register: bool = False) -> bool:
        """The heartbeat key, holding this process's live connection count; with
        `register`, this process in the set of processes too, and whether it was
        missing there."""
        total = sum(self._local.values())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._process_key(self._process), total, ex=self._ttl)
            if register:
                pipe.sadd(self._processes_key, self._process)
            answers = await pipe.execute()
        return register and answers[1] == 1

    async def _reap(self) -> list[uuid.UUID]:
        """Clean up after every process whose heartbeat expired; the users it served who
        are connected nowhere else now."""
        others = [
            p
            for p in await self._redis.smembers(self._processes_key)
            if p.decode() != self._process
        ]
        if not others:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for process in others:
                pipe.exists(self._process_key(process.decode()))
            alive = await pipe.execute()
        offline: list[uuid.UUID] = []
        for process, exists in zip(others, alive, strict=True):
            # Of the live processes that find it dead, the one whose SREM removes it
            # cleans up after it, so its users are announced offline once.
            if exists or not await self._redis.srem(self._processes_key, process):
                continue
            name = process.decode()
            users = [
                uuid.UUID(hex=u.decode()) for u in await self._redis.smembers(self._users_key(name))
            ]
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id in users:
                    pipe.hdel(self._user_key(user_id), name)
                pipe.delete(self._users_key(name))
                await pipe.execute()
            if users:
                counts = await self._counts(users)
                offline += [u for u in users if counts[u] == 0]
            log.info("presence_process_reaped", process=name, users=len(users))
        return offline

    async def processes(self) -> dict[str, int]:
        """Live connections per process, for every process whose heartbeat is fresh."""
        await self._announce_process()
        prefix = self._process_key("")
        keys = [key async for key in self._redis.scan_iter(match=prefix + "*", count=500)]
        values = await self._redis.mget(keys) if keys else []
        return {
            key.decode()[len(prefix) :]: int(value)
            for key, value in zip(keys, values, strict=True)
            if value is not None
        }

    async def add(self, user_id: uuid.UUID) -> int:
        async with self._lock:
            self._local[user_id] = self._local.get(user_id, 0) + 1
            try:
                entry = await self._write(user_id)
            except BaseException:
                # Not connected after all: the caller refuses the connection.
                self._local[user_id] -= 1
                if not self._local[user_id]:
                    del self._local[user_id]
                self._dirty.add(user_id)
                raise
        return (await self._live_totals([user_id], [entry]))[user_id]

    async def remove(self, user_id: uuid.UUID) -> int:
        async with self._lock:
            left = self._local.get(user_id, 0) - 1
            if left > 0:
                self._local[user_id] = left
            else:
                self._local.pop(user_id, None)
            try:
                entry = await self._write(user_id)
            except BaseException:
                self._dirty.add(user_id)
                raise
        return (await self._live_totals([user_id], [entry]))[user_id]

    def _queue_write(self, pipe: Any, user_id: uuid.UUID) -> None:
        n = self._local.get(user_id, 0)
        if n > 0:
            pipe.hset(self._user_key(user_id), self._process, n)
            pipe.sadd(self._users_key(self._process), user_id.hex)
        else:
            pipe.hdel(self._user_key(user_id), self._process)
            pipe.srem(self._users_key(self._process), user_id.hex)

    async def _write(self, user_id: uuid.UUID) -> dict[bytes, bytes]:
        """Write this process's count for the user and read every process's, atomically.
        The caller holds the lock."""
        async with self._redis.pipeline(transaction=True) as pipe:
            self._queue_write(pipe, user_id)
            pipe.hgetall(self._user_key(user_id))
            *_, entry = await pipe.execute()
        return dict(entry)

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
        return await self._live_totals(user_ids, per_user)

    async def _live_totals(
        self, user_ids: Sequence[uuid.UUID], per_user: Sequence[dict[bytes, bytes]]
    ) -> dict[uuid.UUID, int]:
        """Sum each user's counts over the processes still alive: a crashed process's
        heartbeat key has expired, which says to ignore its entries (and clear them)."""
        processes = sorted({p for entry in per_user for p in entry})
        alive: set[bytes] = set()
        if processes:
            async with self._redis.pipeline(transaction=False) as pipe:
                for process in processes:
                    pipe.exists(self._process_key(process.decode()))
                for process, exists in zip(processes, await pipe.execute(), strict=True):
                    if exists:
                        alive.add(process)
        if len(alive) < len(processes):
            await self._clear_dead(user_ids, per_user, alive)
        return {
            user_id: sum(int(n) for p, n in entry.items() if p in alive)
            for user_id, entry in zip(user_ids, per_user, strict=True)
        }

    async def _clear_dead(
        self,
        user_ids: Sequence[uuid.UUID],
        per_user: Sequence[dict[bytes, bytes]],
        alive: set[bytes],
    ) -> None:
        """Delete the entries of processes that died without cleaning up; otherwise the
        hash of every user they served keeps them for ever. A process that was only late
        with its heartbeat writes its counts again at its next refresh."""
        with contextlib.suppress(Exception):
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id, entry in zip(user_ids, per_user, strict=True):
                    dead = [p for p in entry if p not in alive]
                    if dead:
                        pipe.hdel(self._user_key(user_id), *dead)
                await pipe.execute()


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
