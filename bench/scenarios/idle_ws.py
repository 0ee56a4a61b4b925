"""idle_ws: the server's memory per idle WebSocket (§11: ≤ 20 KiB).

One Parley process. Users (quick 200, full 500) are each in three groups of eight, like
people in a few team chats. A few load-generator processes (uvloop, the `websockets`
client offering per-message deflate as browsers do) open the connections (quick 2000,
full 5000) with `?token=`, spread evenly over the users, and wait for each `ready`.

The baseline is taken after warm-up connections are open (imports, the database pool and
the Redis connections are then in it): RSS growth from there, divided by the number of
connections opened after it, is `kib_per_connection`. The connections are opened in four
steps with a reading after each, so the slope of RSS over connections is reported beside
the end-to-end figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from typing import Any

import orjson

from bench.common import (
    BenchUser,
    Workers,
    create_groups,
    fresh_database,
    live_connections,
    progress,
    register_users,
    start_parley,
)

PROCESSES = 4
WARM_CONNECTIONS = 32  # at least the database pool size, so the pool is in the baseline
GROUPS_PER_USER = 3
GROUP_SIZE = 8
STEPS = 4
SETTLE_STEP_S = 1.5
SETTLE_END_S = 5.0
OPEN_CONCURRENCY = 32  # handshakes in flight per worker process
OPEN_TIMEOUT = 60.0


# -- worker side (runs in the load-generator processes) ---------------------------------


async def _drain(ws: Any, stats: dict[str, Any]) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
        async for _ in ws:
            stats["frames"] += 1
    except ConnectionClosed:
        pass
    finally:
        stats["closed"][f"{ws.close_code} {ws.close_reason or ''}".strip()] += 1


async def _open(url: str, stats: dict[str, Any]) -> Any:
    from websockets.asyncio.client import connect

    ws = await connect(
        url,
        open_timeout=OPEN_TIMEOUT,
        ping_interval=None,  # idle: the client only answers the server's pings
        close_timeout=5,
        proxy=None,
        max_queue=None,
    )
    try:
        first = orjson.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
        if first.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {first.get('type')}")
    except BaseException:
        await ws.close()
        raise
    stats["tasks"].add(asyncio.create_task(_drain(ws, stats)))
    return ws


async def cmd_open(state: dict[str, Any], arg: dict[str, Any]) -> dict[str, Any]:
    """Open one WebSocket per URL and wait for each `ready`."""
    stats = state.setdefault("stats", {"frames": 0, "closed": Counter(), "tasks": set()})
    conns: list[Any] = state.setdefault("conns", [])
    sem = asyncio.Semaphore(arg.get("concurrency", OPEN_CONCURRENCY))
    errors: Counter[str] = Counter()
    started = time.perf_counter()

    async def one(url: str) -> None:
        async with sem:
            try:
                conns.append(await _open(url, stats))
            except Exception as exc:
                errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1

    await asyncio.gather(*(one(u) for u in arg["urls"]))
    return {
        "opened": len(arg["urls"]) - sum(errors.values()),
        "errors": dict(errors),
        "seconds": time.perf_counter() - started,
    }


async def cmd_status(state: dict[str, Any], arg: Any) -> dict[str, Any]:
    stats = state.get("stats", {"frames": 0, "closed": Counter(), "tasks": set()})
    conns = state.get("conns", [])
    return {
        "open": sum(1 for ws in conns if ws.close_code is None),
        "frames": stats["frames"],
        "closed": {str(k): v for k, v in stats["closed"].items()},
    }


async def cmd_close(state: dict[str, Any], arg: Any) -> int:
    conns = state.get("conns", [])
    sem = asyncio.Semaphore(OPEN_CONCURRENCY * 4)

    async def one(ws: Any) -> None:
        async with sem:
            with contextlib.suppress(Exception):
                await ws.close()

    await asyncio.gather(*(one(ws) for ws in conns))
    state["conns"] = []
    return len(conns)


# -- parent side -------------------------------------------------------------------------


async def make_groups(
    base: str, users: list[BenchUser], *, per_user: int, size: int, seed: int = 7
) -> list[str]:
    """Each user ends up in `per_user` groups of about `size` people."""
    rng = random.Random(seed)  # noqa: S311 (a fixed layout, not a secret)
    plans: list[list[BenchUser]] = []
    for _ in range(per_user):
        order = users[:]
        rng.shuffle(order)
        plans += [order[i : i + size] for i in range(0, len(order), size)]
    return await create_groups(base, plans, "team")


def _shard(items: list[Any], count: int) -> list[list[Any]]:
    return [items[i::count] for i in range(count)]


def _slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per connection over (connections, rss) readings."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx if sxx else float("nan")


async def run(quick: bool) -> dict[str, Any]:
    connections = 2000 if quick else 5000
    user_count = 200 if quick else 500
    mib = 1024 * 1024
    async with fresh_database("idle_ws") as db:
        server = await start_parley(db, name="parley-idle-ws")
        workers: Workers | None = None
        try:
            progress(f"idle_ws: {user_count} users, each in {GROUPS_PER_USER} groups")
            users = await register_users(server.base, user_count, "idle")
            groups = await make_groups(
                server.base, users, per_user=GROUPS_PER_USER, size=GROUP_SIZE
            )
            workers = Workers(PROCESSES, __name__)
            ws_base = f"ws://127.0.0.1:{server.port}/api/v1/ws?token="
            urls = [ws_base + users[i % user_count].token for i in range(connections)]

            # Warm-up: counted in the baseline, and kept open.
            warm = [ws_base + users[-1 - i % user_count].token for i in range(WARM_CONNECTIONS)]
            opened = await workers.call("open", [{"urls": s} for s in _shard(warm, len(workers))])
            if sum(o["opened"] for o in opened) != WARM_CONNECTIONS:
                raise RuntimeError(f"warm-up connections failed: {opened}")
            await asyncio.sleep(SETTLE_END_S)
            rss_before = server.rss_bytes()
            cpu_before = server.cpu_seconds()
            gen_cpu_before = workers.cpu_seconds()
            progress(f"idle_ws: baseline RSS {rss_before / mib:.1f} MiB")

            points = [(0, rss_before)]
            open_errors: Counter[str] = Counter()
            connect_seconds = 0.0
            per_step = -(-connections // STEPS)
            done = 0
            for step in range(STEPS):
                batch = urls[done : done + per_step]
                started = time.perf_counter()
                results = await workers.call(
                    "open", [{"urls": s} for s in _shard(batch, len(workers))]
                )
                connect_seconds += time.perf_counter() - started
                for r in results:
                    open_errors.update(r["errors"])
                done += len(batch)
                await asyncio.sleep(SETTLE_STEP_S)
                points.append((done, server.rss_bytes()))
                progress(
                    f"idle_ws: step {step + 1}/{STEPS}: {done} opened "
                    f"({sum(r['opened'] for r in results)}/{len(batch)} ok), "
                    f"RSS {points[-1][1] / mib:.1f} MiB"
                )
            connect_cpu = server.cpu_seconds() - cpu_before
            gen_cpu = workers.cpu_seconds() - gen_cpu_before
            await asyncio.sleep(SETTLE_END_S)
            rss_after = server.rss_bytes()
            status = await workers.call("status", [None] * len(workers))
            still_open = sum(s["open"] for s in status) - WARM_CONNECTIONS
            server_count = await live_connections(server.base) - WARM_CONNECTIONS
            closed: Counter[str] = Counter()
            for s in status:
                closed.update(s["closed"])
            opened_ok = done - sum(open_errors.values())

            await workers.call("close", [None] * len(workers))
            await asyncio.sleep(2.0)
            rss_closed = server.rss_bytes()
        finally:
            if workers is not None:
                workers.close()
            server.stop()

    # Per connection that is open at the reading (one closed meanwhile no longer counts).
    kib = (rss_after - rss_before) / max(still_open, 1) / 1024
    result = {
        "kib_per_connection": round(kib, 2),
        "kib_per_connection_slope": round(_slope(points) / 1024, 2),
        "connections": still_open,
        "connections_opened": opened_ok,
        "connections_requested": connections,
        "open_errors": dict(open_errors),
        "still_open_at_end": still_open,
        "server_live_connections": server_count,
        "closed_by_server": dict(closed),
        "rss_before_mib": round(rss_before / mib, 1),
        "rss_after_mib": round(rss_after / mib, 1),
        "rss_after_close_mib": round(rss_closed / mib, 1),
        "rss_steps_mib": [[c, round(r / mib, 1)] for c, r in points],
        "users": user_count,
        "groups": len(groups),
        "connect_seconds": round(connect_seconds, 2),
        "server_cpu_ms_per_handshake": round(1000 * connect_cpu / max(opened_ok, 1), 2),
        "loadgen_cpu_s": round(gen_cpu, 2),
        "loadgen_processes": PROCESSES,
        "goal_kib": 20,
    }
    progress(
        f"idle_ws: {still_open} connections, {kib:.1f} KiB each "
        f"(slope {result['kib_per_connection_slope']} KiB), RSS "
        f"{result['rss_before_mib']} → {result['rss_after_mib']} MiB"
    )
    if opened_ok != connections or still_open != opened_ok:
        progress(
            f"idle_ws: WARNING {connections - opened_ok} failed to open "
            f"({dict(open_errors)}), {opened_ok - still_open} closed meanwhile ({dict(closed)})"
        )
    return result
