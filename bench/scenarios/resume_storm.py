"""resume_storm: every client of a process reconnects at once and resumes (§11: 2,000
clients all caught up, nothing lost).

C clients (quick 500, full 2000), one user each, in groups of ten (C/10 group
conversations), are connected over WebSocket from a few load-generator processes. One
message per group is sent while they are live; each client records the seq it saw as
its cursor. Then every client disconnects, and 20 messages go into every group through
the REST API (real sends, real events). At one agreed instant all C clients reconnect,
each sending `resume` with its cursor as soon as it has `ready`.

`seconds` is the time from that instant until the last client has `resumed` and all 20
missed messages. Each client checks what it got against the seqs it missed: `lost` is
the missed messages that never arrived (a client that never got back counts all 20),
`duplicates` the ones that came twice or that it had already seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from typing import Any

import httpx
import orjson

from bench.common import (
    BenchUser,
    Workers,
    create_groups,
    fresh_database,
    live_connections,
    percentile,
    progress,
    register_users,
    start_parley,
)

PROCESSES = 4
GROUP_SIZE = 10
MISSED = 20
SEND_CONCURRENCY = 32
OPEN_CONCURRENCY = 32  # handshakes in flight per worker while setting up (not the storm)
OPEN_TIMEOUT = 60.0
CONNECT_ATTEMPTS = 5  # a client whose handshake fails retries, as real clients do


# -- worker side (runs in the load-generator processes) ---------------------------------

_READERS: set[asyncio.Task[None]] = set()


class Client:
    __slots__ = (
        "attempts", "caught", "caught_at", "closed", "conv", "cursor", "done", "error", "ready_at",
        "resume_at", "resumed_at", "seqs", "target", "token", "ws",
    )  # fmt: skip

    def __init__(self, token: str, conv: str) -> None:
        self.token = token
        self.conv = conv
        self.ws: Any = None
        self.cursor = 0
        self.target: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the first connection's progress before the storm (the cursor stays)."""
        self.seqs: list[int] = []
        self.caught = asyncio.Event()
        self.done = asyncio.Event()
        self.ready_at = self.resume_at = self.resumed_at = self.caught_at = 0.0
        self.attempts = 0
        self.error = ""
        self.closed = ""

    def check(self) -> None:
        if self.target is None or not self.resumed_at or self.caught.is_set():
            return
        have = set(self.seqs)
        if all(s in have for s in range(self.cursor + 1, self.target + 1)):
            self.caught_at = time.time()
            self.caught.set()
            self.done.set()


async def _read(client: Client) -> None:
    from websockets.exceptions import ConnectionClosed

    ws = client.ws
    try:
        async for raw in ws:
            frame = orjson.loads(raw)
            kind = frame.get("type")
            if kind == "resumed":
                client.resumed_at = time.time()
                client.check()
            elif frame.get("conversation_id") == client.conv and frame.get("seq") is not None:
                client.seqs.append(frame["seq"])
                client.check()
    except ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None and ws.close_code != 1000:
            client.closed = f"closed by the server: {ws.close_code} {ws.close_reason or ''}".strip()
        client.done.set()  # caught up or not, nothing more will come on this socket


async def _connect(client: Client, url: str) -> None:
    """Connect (retrying a failed handshake with a short jittered back-off) and wait for
    `ready`; the reader runs from then on."""
    from websockets.asyncio.client import connect

    for attempt in range(CONNECT_ATTEMPTS):
        client.attempts = attempt + 1
        try:
            ws = await connect(
                url + client.token,
                open_timeout=OPEN_TIMEOUT,
                ping_interval=None,
                close_timeout=5,
                proxy=None,
                max_queue=None,
            )
            first = orjson.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
            if first.get("type") != "ready":
                await ws.close()
                raise RuntimeError(f"expected ready, got {first.get('type')}")
        except Exception as exc:
            client.error = f"{type(exc).__name__}: {str(exc)[:100]}"
            if attempt + 1 == CONNECT_ATTEMPTS:
                raise
            jitter = 0.5 + random.random()  # noqa: S311 (not a secret)
            await asyncio.sleep(0.5 * (attempt + 1) * jitter)
            continue
        client.error = ""
        client.ready_at = time.time()
        client.ws = ws
        task = asyncio.create_task(_read(client))
        _READERS.add(task)
        task.add_done_callback(_READERS.discard)
        return


async def cmd_connect(state: dict[str, Any], arg: dict[str, Any]) -> dict[str, Any]:
    clients = state["clients"] = [Client(token, conv) for token, conv in arg["clients"]]
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)
    errors: Counter[str] = Counter()

    async def one(client: Client) -> None:
        async with sem:
            try:
                await _connect(client, arg["url"])
            except Exception:
                errors[client.error] += 1

    await asyncio.gather(*(one(c) for c in clients))
    return {"opened": len(clients) - sum(errors.values()), "errors": dict(errors)}


async def cmd_live(state: dict[str, Any], arg: dict[str, Any]) -> dict[str, Any]:
    """Wait until each client has seen its group's live message; that seq is its cursor."""
    expected: dict[str, int] = arg["expected"]
    deadline = time.monotonic() + arg["timeout"]
    clients: list[Client] = state["clients"]
    while time.monotonic() < deadline:
        if all(max(c.seqs, default=0) >= expected[c.conv] for c in clients):
            break
        await asyncio.sleep(0.05)
    missing = 0
    why: Counter[str] = Counter()
    for c in clients:
        c.cursor = max(c.seqs, default=0)
        if c.cursor < expected[c.conv]:
            missing += 1
            why[c.closed or "still open"] += 1
            c.cursor = expected[c.conv]  # what it should have seen
    return {"missing": missing, "why": dict(why)}


async def cmd_disconnect(state: dict[str, Any], arg: Any) -> int:
    clients: list[Client] = state["clients"]
    sem = asyncio.Semaphore(OPEN_CONCURRENCY * 4)

    async def one(c: Client) -> None:
        async with sem:
            if c.ws is not None:
                with contextlib.suppress(Exception):
                    await c.ws.close()
                c.ws = None

    await asyncio.gather(*(one(c) for c in clients))
    return len(clients)


async def cmd_storm(state: dict[str, Any], arg: dict[str, Any]) -> list[dict[str, Any]]:
    """At `start_at` (wall clock, shared by all workers) every client reconnects, sends
    `resume` with its cursor once `ready`, and waits until it has `resumed` and every
    seq up to its group's target."""
    clients: list[Client] = state["clients"]
    start_at: float = arg["start_at"]
    targets: dict[str, int] = arg["targets"]
    for c in clients:
        c.reset()
        c.target = targets[c.conv]

    async def one(c: Client) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        try:
            await _connect(c, arg["url"])
        except Exception:
            return
        c.resume_at = time.time()
        await c.ws.send(
            orjson.dumps({"op": "resume", "ref": "r", "cursors": {c.conv: c.cursor}}).decode()
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(c.done.wait(), max(1.0, start_at + arg["timeout"] - time.time()))
        if not c.caught.is_set():
            c.error = c.closed or "timed out waiting for the missed messages"

    await asyncio.gather(*(one(c) for c in clients))
    await asyncio.sleep(arg.get("linger", 0.5))  # late duplicates still count
    out = []
    for c in clients:
        seen = Counter(c.seqs)
        missed = range(c.cursor + 1, c.target + 1) if c.target is not None else range(0)
        out.append(
            {
                "ready_s": c.ready_at - start_at if c.ready_at else None,
                "caught_s": c.caught_at - start_at if c.caught_at else None,
                "resume_to_caught_s": c.caught_at - c.resume_at if c.caught_at else None,
                "lost": sum(1 for s in missed if s not in seen),
                "duplicates": sum(n - 1 for n in seen.values() if n > 1)
                + sum(n for s, n in seen.items() if s <= c.cursor),
                "attempts": c.attempts,
                "error": c.error,
            }
        )
    return out


# -- parent side -------------------------------------------------------------------------


async def _groups(base: str, users: list[BenchUser]) -> list[tuple[str, list[BenchUser]]]:
    plans = [users[i : i + GROUP_SIZE] for i in range(0, len(users), GROUP_SIZE)]
    ids = await create_groups(base, plans, "storm")
    return list(zip(ids, plans, strict=True))


async def _send(
    base: str, groups: list[tuple[str, list[BenchUser]]], per_group: int, label: str
) -> dict[str, list[int]]:
    """`per_group` messages into every group over REST, one after another within a group
    (members take turns), groups in parallel. Returns the seqs per group."""
    seqs: dict[str, list[int]] = {conv: [] for conv, _ in groups}
    sem = asyncio.Semaphore(SEND_CONCURRENCY)
    limits = httpx.Limits(
        max_connections=SEND_CONCURRENCY, max_keepalive_connections=SEND_CONCURRENCY
    )
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def group(conv: str, members: list[BenchUser]) -> None:
            async with sem:
                for k in range(per_group):
                    sender = members[k % len(members)]
                    resp = await client.post(
                        f"/api/v1/conversations/{conv}/messages",
                        json={"content": f"{label} {k} from {sender.username}",
                              "client_msg_id": f"{label}-{k}"},
                        headers=sender.headers,
                    )  # fmt: skip
                    resp.raise_for_status()
                    seqs[conv].append(resp.json()["seq"])

        await asyncio.gather(*(group(conv, members) for conv, members in groups))
    return seqs


async def _wait_connections(base: str, want: int, within: float) -> int:
    deadline = time.monotonic() + within
    count = await live_connections(base)
    while count != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        count = await live_connections(base)
    return count


async def run(quick: bool) -> dict[str, Any]:
    count = 500 if quick else 2000
    timeout = 60.0 if quick else 120.0
    async with fresh_database("resume_storm") as db:
        server = await start_parley(db, name="parley-resume-storm")
        workers: Workers | None = None
        try:
            progress(f"resume_storm: {count} users in groups of {GROUP_SIZE}")
            users = await register_users(server.base, count, "storm")
            groups = await _groups(server.base, users)
            conv_of = {u.id: conv for conv, members in groups for u in members}
            workers = Workers(PROCESSES, __name__)
            url = f"ws://127.0.0.1:{server.port}/api/v1/ws?token="
            shards: list[list[tuple[str, str]]] = [[] for _ in range(PROCESSES)]
            for i, u in enumerate(users):
                shards[i % PROCESSES].append((u.token, conv_of[u.id]))

            started = time.monotonic()
            opened = await workers.call("connect", [{"url": url, "clients": s} for s in shards])
            errors: Counter[str] = Counter()
            for o in opened:
                errors.update(o["errors"])
            if errors:
                raise RuntimeError(f"setup connections failed: {dict(errors)}")
            progress(f"resume_storm: {count} connected in {time.monotonic() - started:.1f} s")

            live = await _send(server.base, groups, 1, "live")
            expected = {conv: max(s) for conv, s in live.items()}
            seen = await workers.call("live", [{"expected": expected, "timeout": 15.0}] * PROCESSES)
            missed_live = sum(s["missing"] for s in seen)
            if missed_live:
                why: Counter[str] = Counter()
                for s in seen:
                    why.update(s["why"])
                progress(
                    f"resume_storm: WARNING {missed_live} clients missed a live message: "
                    f"{dict(why)}"
                )

            await workers.call("disconnect", [None] * PROCESSES)
            left = await _wait_connections(server.base, 0, 30.0)
            progress(f"resume_storm: all disconnected (server counts {left} live)")

            started = time.monotonic()
            sent = await _send(server.base, groups, MISSED, "missed")
            send_s = time.monotonic() - started
            targets = {conv: max(s) for conv, s in sent.items()}
            contiguous = all(
                sorted(s) == list(range(expected[conv] + 1, expected[conv] + MISSED + 1))
                for conv, s in sent.items()
            )
            progress(
                f"resume_storm: {MISSED * len(groups)} messages sent over REST in {send_s:.1f} s"
                f" ({MISSED * len(groups) / send_s:.0f}/s); storm of {count} resumes"
            )

            cpu_before = server.cpu_seconds()
            gen_before = workers.cpu_seconds()
            rss_before = server.rss_bytes()
            start_at = time.time() + 1.0
            results = [
                r
                for shard in await workers.call(
                    "storm",
                    [{"url": url, "start_at": start_at, "targets": targets, "timeout": timeout}]
                    * PROCESSES,
                )
                for r in shard
            ]
            server_cpu = server.cpu_seconds() - cpu_before
            gen_cpu = workers.cpu_seconds() - gen_before
            rss_peak = server.rss_bytes()
            reconnected = await live_connections(server.base)
        finally:
            if workers is not None:
                workers.close()
            server.stop()

    caught = [r["caught_s"] for r in results if r["caught_s"] is not None]
    ready = [r["ready_s"] for r in results if r["ready_s"] is not None]
    resume = [r["resume_to_caught_s"] for r in results if r["resume_to_caught_s"] is not None]
    failures = Counter(r["error"] for r in results if r["error"])
    lost = sum(r["lost"] for r in results)
    everyone = len(caught) == count
    result = {
        # Not measured (None) unless every client caught up: `lost` then says why.
        "seconds": round(max(caught), 3) if everyone else None,
        "lost": lost,
        "duplicates": sum(r["duplicates"] for r in results),
        "clients": count,
        "clients_caught_up": len(caught),
        "missed_per_client": MISSED,
        "conversations": len(groups),
        "all_ready_s": round(max(ready), 3) if ready else None,
        "p50_caught_s": round(percentile(caught, 50), 3) if caught else None,
        "p99_caught_s": round(percentile(caught, 99), 3) if caught else None,
        "p50_resume_to_caught_ms": round(percentile(resume, 50) * 1000, 1) if resume else None,
        "p99_resume_to_caught_ms": round(percentile(resume, 99) * 1000, 1) if resume else None,
        "connect_retries": sum(r["attempts"] - 1 for r in results if r["attempts"]),
        "failures": dict(failures),
        "server_live_after": reconnected,
        "server_cpu_s": round(server_cpu, 2),
        "server_rss_mib_after": round(rss_peak / 1024 / 1024, 1),
        "server_rss_growth_mib": round((rss_peak - rss_before) / 1024 / 1024, 1),
        "loadgen_cpu_s": round(gen_cpu, 2),
        "loadgen_processes": PROCESSES,
        "missed_live_messages": missed_live,
        "rest_send_s": round(send_s, 2),
        "rest_seqs_contiguous": contiguous,
    }
    progress(
        f"resume_storm: {len(caught)}/{count} caught up in {result['seconds']} s "
        f"(all ready {result['all_ready_s']} s), lost {lost}, "
        f"duplicates {result['duplicates']}, failures {dict(failures)}"
    )
    return result
