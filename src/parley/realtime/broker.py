"""Brokers carry published events between processes.

`MemoryBroker` is the embedded default (one process). `RedisBroker` uses Redis pub/sub
with one subscription connection per process and one channel per conversation (and per
user), subscribed only while a local connection needs it.

Pub/sub is at-most-once: a message published while a subscriber is disconnected is gone.
The hub makes up for that from the database (a hole in the seq, or a catch-up after a
reconnect), so a broker only needs to say when its subscription was interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import structlog

log = structlog.get_logger("parley.broker")

OnMessage = Callable[[str, bytes], None]
OnReconnect = Callable[[], Awaitable[None]]

# How long subscribe() waits for Redis to confirm: a connection is only announced ready
# once its channels are live, so this bounds how long a handshake can hang on Redis.
SUBSCRIBE_TIMEOUT = 10.0
# Redis is pinged on an idle subscription this often, so a silently dead connection is
# noticed (and caught up) within a few seconds.
HEALTH_CHECK_INTERVAL = 5
RECONNECT_BACKOFF = (0.05, 2.0)  # first and largest wait between reconnect attempts


class Broker(Protocol):
    async def start(self, on_message: OnMessage, on_reconnect: OnReconnect) -> None: ...
    async def publish(self, channel: str, data: bytes) -> None: ...
    async def subscribe(self, channels: Iterable[str]) -> None: ...
    async def unsubscribe(self, channels: Iterable[str]) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class MemoryBroker:
    """In-process: publish hands the message to this process's hub on the next loop turn,
    in publish order, as a pub/sub round trip would."""

    def __init__(self) -> None:
        self._on_message: OnMessage | None = None
        self._channels: set[str] = set()

    async def start(self, on_message: OnMessage, on_reconnect: OnReconnect) -> None:
        self._on_message = on_message

    async def publish(self, channel: str, data: bytes) -> None:
        if self._on_message is not None and channel in self._channels:
            asyncio.get_running_loop().call_soon(self._on_message, channel, data)

    async def subscribe(self, channels: Iterable[str]) -> None:
        self._channels.update(channels)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._channels.difference_update(channels)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._on_message = None


class RedisBroker:
    def __init__(self, url: str, *, prefix: str) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._prefix = prefix + ":"
        # One immediate retry on a connection error: after a Redis restart each pooled
        # connection is dead until its first use fails, and without the retry the first
        # publish on it would be lost to pub/sub (found again only by the hubs' sweep,
        # seconds later). A publish repeated after a lost reply is harmless: hubs drop a
        # seq they have routed, and an ephemeral event (typing, presence) seen twice
        # changes nothing.
        self._publisher = aioredis.from_url(url, retry=Retry(NoBackoff(), 1))
        # No silent retries on the subscription: redis-py would reconnect and
        # resubscribe on its own, and the messages lost meanwhile would go unnoticed.
        # Parley reconnects itself and then catches up from the database.
        self._subscriber = aioredis.from_url(
            url, retry=Retry(NoBackoff(), 0), health_check_interval=HEALTH_CHECK_INTERVAL
        )
        self._pubsub: Any = None
        self._channels: set[str] = set()
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._on_message: OnMessage | None = None
        self._on_reconnect: OnReconnect | None = None
        self._closed = False
        # Publishes waiting for the one in flight: they go out together.
        self._batch: list[tuple[str, bytes]] = []
        self._batch_sent: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self, on_message: OnMessage, on_reconnect: OnReconnect) -> None:
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._task = asyncio.create_task(self._run(), name="parley-redis-subscriber")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_TIMEOUT)

    async def publish(self, channel: str, data: bytes) -> None:
        """Publish, returning once Redis took it. Publishes made while another is in
        flight go out together in one pipeline: one round trip and one write for many
        sends under load, in the order they were made."""
        sent = self._batch_sent
        if sent is None:
            sent = self._batch_sent = asyncio.get_running_loop().create_future()
            # Read here if every publisher of the batch has gone (cancelled).
            sent.add_done_callback(_retrieve)
        self._batch.append((self._prefix + channel, data))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_batches(), name="parley-redis-publish")
        # Shielded: a cancelled publisher must not cancel the others' batch.
        await asyncio.shield(sent)

    async def _send_batches(self) -> None:
        try:
            while self._batch:
                batch, sent = self._batch, self._batch_sent
                self._batch, self._batch_sent = [], None
                assert sent is not None
                try:
                    async with self._publisher.pipeline(transaction=False) as pipe:
                        for name, data in batch:
                            pipe.publish(name, data)
                        await pipe.execute()
                except Exception as exc:
                    sent.set_exception(exc)
                except BaseException:
                    sent.cancel()  # the process is going down: no one waits forever
                    raise
                else:
                    sent.set_result(None)
        finally:
            self._sender = None

    async def subscribe(self, channels: Iterable[str]) -> None:
        new = [c for c in channels if c not in self._channels]
        if not new:
            return
        self._channels.update(new)
        if not self._connected.is_set():
            # Subscribed when the connection comes back; the reconnect catch-up covers
            # what was published meanwhile.
            return
        names = [(self._prefix + c).encode() for c in new]
        loop = asyncio.get_running_loop()
        waiters = []
        for name in names:
            future = self._confirm.get(name)
            if future is None or future.done():
                future = loop.create_future()
                self._confirm[name] = future
            waiters.append(future)
        try:
            async with self._lock:
                await self._pubsub.subscribe(*names)
            await asyncio.wait_for(asyncio.gather(*waiters), SUBSCRIBE_TIMEOUT)
        except Exception:
            # The listener reconnects and resubscribes everything in _channels.
            log.warning("subscribe_failed", channels=len(names))

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        gone = [c for c in channels if c in self._channels]
        if not gone:
            return
        self._channels.difference_update(gone)
        if self._connected.is_set():
            with contextlib.suppress(Exception):
                async with self._lock:
                    await self._pubsub.unsubscribe(*[(self._prefix + c).encode() for c in gone])

    async def ping(self) -> bool:
        try:
            return bool(await self._publisher.ping()) and self._connected.is_set()
        except Exception:
            return False

    async def close(self) -> None:
        self._closed = True
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await self._sender
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop_pubsub()
        await self._subscriber.aclose()
        await self._publisher.aclose()

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._connected.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _connect(self) -> None:
        pubsub = self._subscriber.pubsub()
        # A PING on the fresh connection proves Redis answers before we call it live.
        await pubsub.ping()
        names = [(self._prefix + c).encode() for c in self._channels]
        if names:
            await pubsub.subscribe(*names)
        self._pubsub = pubsub
        self._connected.set()

    async def _run(self) -> None:
        backoff = RECONNECT_BACKOFF[0]
        interrupted = False
        while not self._closed:
            try:
                await self._connect()
                if interrupted:
                    log.info("broker_reconnected", channels=len(self._channels))
                    interrupted = False
                    if self._on_reconnect is not None:
                        await self._on_reconnect()
                backoff = RECONNECT_BACKOFF[0]
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not interrupted:
                    log.warning("broker_disconnected", error=type(exc).__name__)
                interrupted = True
                await self._drop_pubsub()
                for future in self._confirm.values():
                    if not future.done():
                        future.set_exception(ConnectionError("broker disconnected"))
                self._confirm.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF[1])

    async def _listen(self) -> None:
        prefix_len = len(self._prefix)
        while not self._closed:
            message = await self._pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind = message["type"]
            if kind == "message" and self._on_message is not None:
                channel = message["channel"].decode()[prefix_len:]
                self._on_message(channel, message["data"])
            elif kind == "subscribe":
                future = self._confirm.pop(message["channel"], None)
                if future is not None and not future.done():
                    future.set_result(None)
