"""Rate limits on top of `limits`: in memory for one process, in Redis for many."""

from __future__ import annotations

import math
import time
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from parley.config import Settings
from parley.errors import RateLimited


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limits == "on"
        storage: Storage
        if settings.redis_url:
            storage = RedisStorage(
                "async+" + settings.redis_url,
                implementation="redispy",
                key_prefix=f"{settings.redis_prefix}:rl",
            )
        else:
            storage = MemoryStorage()
        self._storage = storage
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self.login = parse(settings.login_rate)
        self.register = parse(settings.register_rate)
        self.send = parse(settings.send_rate)
        self.requests = parse(settings.request_rate)

    async def aclose(self) -> None:
        """Close the Redis connections of the limiter's storage (nothing in memory)."""
        # `limits` offers no close(); its redis-py client sits on the storage's bridge.
        bridge: Any = getattr(self._storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        if client is not None:
            await client.aclose()

    async def check(self, item: RateLimitItem, *identifiers: str) -> None:
        """Count one hit; raise 429 with Retry-After when the limit is spent."""
        if not self.enabled:
            return
        if await self._limiter.hit(item, *identifiers):
            return
        stats = await self._limiter.get_window_stats(item, *identifiers)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(retry_after)
