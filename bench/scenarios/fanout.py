"""fanout: one room, M connected members, an open-loop sender stepped up to the knee.

- Parley: M members (quick 500, full 1000), each one WebSocket (`/api/v1/ws?token=…`)
  held by the receiver processes of `bench.wsload`; one more user sends through the
  WebSocket `send` op over SENDERS connections, round-robin. Each message's content
  carries the sender's intended send time; receivers take end-to-end latency from it.
- bare `websockets` broadcast server (`bench.baselines.bare_ws`): the same M receiving
  clients and SENDERS sending clients, the same load generator, the same frames, the
  same rate ladder.

Each step sends at a fixed offered rate for 3 s (full: 5 s) whatever the server answers,
waits for the acks (Parley) and the deliveries, then checks every client: every message
of the step exactly once, in ascending seq (bare server: in each sender's order).

deliveries/s of a step = the unique messages received by the M members in the middle
98 % of the step's receive times (1st to 99th percentile), ÷ that span: the offered
rate when the server keeps up, and the rate it manages, backlog included, when it falls
behind; a single late straggler does not decide it (the plain first-to-last figure is
kept as `deliveries_per_s_full_span`).

The ladder stops at the knee: deliveries fall below 90 % of what was offered, p50 passes
KNEE_P50_MS (a queue is building up; one slow moment moves only p99) or p99 passes
KNEE_P99_MS, or a message is lost. The bare server climbs the same ladder until its own
knee. Then each side's knee step (its best deliveries/s) runs KNEE_REPEATS more times,
Parley and the bare server in turn, so that whatever else the machine does weighs on
both alike; each figure is the median of its rounds. Last, HALF_KNEE_ROUNDS steps run
at half of Parley's knee rate (its deliveries/s ÷ members per room); p50/p99 are taken
over all their deliveries together. At that rate one step holds a few hundred messages,
so a single stall of the machine (a PostgreSQL commit that waits on the disk, say) can
decide a step's p99 alone; the rounds' own p99s are kept beside it.

Honesty: every step records the CPU of the server, of each load-generator process and
of the whole machine (PostgreSQL and Redis included). On 2 cores the load generator
shares the machine with the server; `loadgen_busiest_process_util` near 1.0 would mean
it, not the server, set the pace.

Full mode also runs 100 rooms × 10 members (`rooms_100x10`): one sending user per room.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any

import httpx
import psutil

from bench.common import (
    BenchUser,
    Server,
    free_port,
    fresh_database,
    percentile,
    progress,
    register_users,
    start_parley,
    start_process,
    summary,
)
from bench.wsload import ClientSpec, WsLoad

SENDERS = 4  # the sender's connections: Parley runs one op at a time per connection
LADDER = [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560]
ROOMS_LADDER = [25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800]
KNEE_REPEATS = 2  # the knee step runs 1 + KNEE_REPEATS times on each side (median)
HALF_KNEE_ROUNDS = 3
KNEE_P50_MS = 200.0
KNEE_P99_MS = 2000.0
RECEIVER_PROCESSES = 2


def _softirq() -> float:
    """Kernel time in (soft) interrupts, much of it the loopback TCP stack; it is not
    charged to any process, so it shows only in the machine's total."""
    t = psutil.cpu_times()
    return float(getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _cpu_busy() -> float:
    t = psutil.cpu_times()
    return float(
        t.user
        + t.system
        + getattr(t, "nice", 0.0)
        + getattr(t, "irq", 0.0)
        + getattr(t, "softirq", 0.0)
    )


async def _step(
    load: WsLoad,
    server: Server,
    label: str,
    step_id: int,
    rate: float,
    per_room: int,
    seconds: float,
) -> dict[str, Any]:
    """One step at `rate` messages/s (over all rooms); each reaches `per_room` members."""
    reconnect = await load.reconnect()
    cpu0, gen0, busy0, wall0 = (
        server.cpu_seconds(),
        load.cpu_seconds(),
        _cpu_busy(),
        time.monotonic(),
    )
    irq0 = _softirq()
    raw = await load.step(
        step_id, rate, seconds, drain=max(3.0, seconds), ack_timeout=max(5.0, 2 * seconds)
    )
    wall = time.monotonic() - wall0
    cpu1, gen1, busy1, irq1 = server.cpu_seconds(), load.cpu_seconds(), _cpu_busy(), _softirq()
    gen = [b - a for a, b in zip(gen0, gen1, strict=True)]
    recv, sent = raw["receivers"], raw["sent"]
    lat = raw["latencies"]
    expected_per_member = {room: len(ns) for room, ns in sent["expected"].items()}
    unique = sum(r["received"] for r in recv) - sum(r["duplicates"] for r in recv)
    # Throughput over the middle 98 % of the deliveries (1st to 99th percentile of the
    # receive times): the sending rate when the server keeps up, the rate it manages,
    # backlog included, when it falls behind; one late straggler does not decide it.
    times = sorted(raw["times"])
    if len(times) >= 100:
        lo, hi = times[round(0.01 * (len(times) - 1))], times[round(0.99 * (len(times) - 1))]
        duration = max(hi - lo, 1e-3) / 0.98
    else:
        duration = seconds
    full_span = (times[-1] - times[0] + 1 / rate) if times else seconds
    lost = sum(r["lost"] for r in recv)
    result = {
        "server": label,
        "offered_per_s": rate,
        "seconds": seconds,
        "sent": sent["sent"],
        "acked": sent["acked"],
        "send_errors": sent["errors"],
        "sender_max_lag_ms": round(sent["max_lag_ms"], 1),
        "deliveries": unique,
        "expected_deliveries": sum(expected_per_member.values()) * per_room,
        "deliveries_per_s": unique / duration,
        "deliveries_per_s_full_span": unique / full_span,
        "offered_deliveries_per_s": rate * per_room,
        "delivery_seconds": round(duration, 3),
        "latencies": lat,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": (max(lat) * 1000) if lat else float("nan"),
        "lost": lost,
        "lost_at_closed": sum(r["lost_at_closed"] for r in recv),
        "duplicates": sum(r["duplicates"] for r in recv),
        "out_of_order": sum(r["out_of_order"] for r in recv),
        "unexpected": sum(r["unexpected"] for r in recv),
        "closed": sum(r["closed"] for r in recv),
        "close_codes": _merge([r["close_codes"] for r in recv]),
        "reconnected_failed": reconnect["failed"],
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "loadgen_cpu_s": round(sum(gen), 2),
        "loadgen_busiest_process_util": round(max(gen) / wall, 2),
        "sender_cpu_s": round(gen[-1], 2),
        "machine_cpu_s": round(busy1 - busy0, 2),
        "machine_irq_s": round(irq1 - irq0, 2),
        "wall_s": round(wall, 2),
    }
    result["server_cpu_util"] = round(result["server_cpu_s"] / wall, 2)
    result["loadgen_cpu_util"] = round(result["loadgen_cpu_s"] / wall, 2)
    result["machine_cpu_util"] = round(result["machine_cpu_s"] / wall, 2)
    progress(
        f"fanout[{label}] {rate:g} msg/s × {per_room}: "
        f"{result['deliveries_per_s']:,.0f} deliveries/s (offered {rate * per_room:,.0f}), "
        f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, lost {lost}, "
        f"dup {result['duplicates']}, order {result['out_of_order']}, closed {result['closed']}, "
        f"cpu server {result['server_cpu_util']:.2f} loadgen {result['loadgen_cpu_util']:.2f} "
        f"machine {result['machine_cpu_util']:.2f}/{psutil.cpu_count()}"
    )
    return result


def _without_latencies(step: dict[str, Any]) -> dict[str, Any]:
    """The step as the JSON keeps it: its percentiles, not every delivery's latency."""
    return {k: v for k, v in step.items() if k != "latencies"}


async def _settle(load: WsLoad, conn: dict[str, Any], total: int, label: str) -> dict[str, Any]:
    """Reconnect members the server closed right after `ready`, until none is.

    Expected to find none. The hub's session sweep used to close, as "session ended"
    (4001), connections that attached while it queried (fixed in hub.py, with
    tests/test_hub.py). Any such close is still counted in `setup_reconnects`, not
    hidden."""
    reconnects: dict[str, int] = {}
    for _ in range(4):
        await asyncio.sleep(2.5)
        again = await load.reconnect()
        closed = again["closed_before"]
        for code, n in closed.items():
            reconnects[code] = reconnects.get(code, 0) + n
        if not closed:
            break
        progress(f"{label}: the server closed {closed} (code: count) after ready; reconnected")
    return {**conn, "open": again["open"], "reconnects": reconnects}


def _merge(counters: list[dict[Any, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            out[str(k)] = out.get(str(k), 0) + v
    return out


def _saturated(step: dict[str, Any]) -> bool:
    """Past the knee: deliveries fall behind the offered rate, a queue builds up (the
    median waits: one slow moment only moves p99), or a message is lost."""
    return bool(
        step["deliveries_per_s"] < 0.9 * step["offered_deliveries_per_s"]
        or step["p50_ms"] > KNEE_P50_MS
        or step["p99_ms"] > KNEE_P99_MS
        or step["lost"] > 0
        or step["closed"] > 0
    )


async def _ladder(
    load: WsLoad,
    server: Server,
    label: str,
    ladder: Sequence[float],
    per_room: int,
    seconds: float,
    first_id: int,
) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for i, rate in enumerate(ladder):
        await load.quiet(idle=0.3, limit=20)
        step = await _step(load, server, label, first_id + i, rate, per_room, seconds)
        steps.append(step)
        if _saturated(step):
            break
    return steps


async def _setup_rooms(
    base: str, owners: list[BenchUser], members: list[BenchUser], per_room: int
) -> list[str]:
    """Each owner creates one room; members join them, per_room each, concurrently."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        rooms: list[str] = []
        for i, owner in enumerate(owners):
            resp = await client.post(
                "/api/v1/conversations",
                json={"kind": "room", "name": f"fanout {i}"},
                headers=owner.headers,
            )
            resp.raise_for_status()
            rooms.append(resp.json()["id"])
        sem = asyncio.Semaphore(32)

        async def join(i: int, user: BenchUser) -> None:
            async with sem:
                resp = await client.post(
                    f"/api/v1/conversations/{rooms[i // per_room]}/join", headers=user.headers
                )
                resp.raise_for_status()

        await asyncio.gather(*(join(i, u) for i, u in enumerate(members)))
    return rooms


def _parley_specs(
    members: list[BenchUser],
    senders: list[BenchUser],
    rooms: list[str],
    per_room: int,
    connections: int,
) -> tuple[list[ClientSpec], list[ClientSpec]]:
    member_specs = [
        ClientSpec(f"/api/v1/ws?token={u.token}", i // per_room) for i, u in enumerate(members)
    ]
    sender_specs = [
        ClientSpec(f"/api/v1/ws?token={senders[r].token}", r, rooms[r])
        for _ in range(connections)
        for r in range(len(rooms))
    ]
    return member_specs, sender_specs


def _bare_specs(
    members: int, rooms: int, per_room: int, connections: int
) -> tuple[list[ClientSpec], list[ClientSpec]]:
    member_specs = [ClientSpec(f"/rooms/{i // per_room}", i // per_room) for i in range(members)]
    sender_specs = [
        ClientSpec(f"/rooms/{r}", r, f"room-{r}") for _ in range(connections) for r in range(rooms)
    ]
    return member_specs, sender_specs


async def _run_size(
    parley: Server,
    *,
    label: str,
    rooms_n: int,
    per_room: int,
    ladder: Sequence[float],
    seconds: float,
    sender_connections: int,
    members: list[BenchUser],
    senders: list[BenchUser],
) -> dict[str, Any]:
    total = rooms_n * per_room
    started = time.monotonic()
    rooms = await _setup_rooms(parley.base, senders, members, per_room)
    progress(
        f"{label}: {rooms_n} room(s) × {per_room} members joined "
        f"in {time.monotonic() - started:.1f} s"
    )

    out: dict[str, Any] = {"members": total, "rooms": rooms_n, "members_per_room": per_room}
    # Both sets of clients stay connected for the whole run (the idle set costs nothing),
    # so the knee can be measured again, Parley and bare server in turn: whatever else
    # the machine is doing then weighs on both sides alike.
    port = free_port()
    bare = await start_process(
        "bare-ws", [sys.executable, "-m", "bench.baselines.bare_ws", "--port", str(port)]
    )
    p_load = WsLoad("127.0.0.1", parley.port, wait_ready=True, receivers=RECEIVER_PROCESSES)
    b_load = WsLoad("127.0.0.1", port, wait_ready=False, receivers=RECEIVER_PROCESSES)
    try:
        t0 = time.monotonic()
        m_specs, s_specs = _parley_specs(members, senders, rooms, per_room, sender_connections)
        conn = await p_load.connect(m_specs, s_specs)
        progress(
            f"{label}: {conn['open']} member + {conn['sender_open']} sender WebSockets open "
            f"on Parley "
            f"in {time.monotonic() - t0:.1f} s (failed {conn['failed']}) {conn['errors'] or ''}"
        )
        conn = await _settle(p_load, conn, total, label)
        out["setup_reconnects"] = conn["reconnects"]
        if conn["open"] != total:
            raise RuntimeError(
                f"only {conn['open']} of {total} members connected: "
                f"{conn['errors']} {conn['not_open']}"
            )
        m_specs, s_specs = _bare_specs(total, rooms_n, per_room, sender_connections)
        conn = await b_load.connect(m_specs, s_specs)
        progress(
            f"{label}: {conn['open']} + {conn['sender_open']} WebSockets open on the bare server"
        )
        if conn["open"] != total:
            raise RuntimeError(
                f"only {conn['open']} of {total} clients connected to the bare server"
            )

        parley_steps = await _ladder(p_load, parley, "parley", ladder, per_room, seconds, 0)
        # The other server's backlog must be gone before each of these steps: a server
        # still draining one (seconds of it past the bare server's knee) takes CPU from
        # the one measured.
        await p_load.quiet(idle=0.5, limit=30)
        bare_steps = await _ladder(b_load, bare, "baseline", ladder, per_room, seconds, 200)
        p_knee = max(parley_steps, key=lambda s: s["deliveries_per_s"])["offered_per_s"]
        b_knee = max(bare_steps, key=lambda s: s["deliveries_per_s"])["offered_per_s"]
        for r in range(KNEE_REPEATS):
            progress(f"{label}: the knee again, round {r + 2}/{KNEE_REPEATS + 1}")
            for load, server, name, rate, steps, base_id in (
                (p_load, parley, "parley", p_knee, parley_steps, 50),
                (b_load, bare, "baseline", b_knee, bare_steps, 250),
            ):
                await asyncio.gather(
                    p_load.quiet(idle=0.5, limit=30), b_load.quiet(idle=0.5, limit=30)
                )
                step = await _step(load, server, name, base_id + r, rate, per_room, seconds)
                step["repeat"] = r + 2
                steps.append(step)
        p_rates = [s["deliveries_per_s"] for s in parley_steps if s["offered_per_s"] == p_knee]
        b_rates = [s["deliveries_per_s"] for s in bare_steps if s["offered_per_s"] == b_knee]
        parley_rate = statistics.median(p_rates)
        bare_rate = statistics.median(b_rates)
        knee_rate = parley_rate / per_room
        half_rate = round(knee_rate / 2, 1)
        half_latencies = array("d")
        half_p99s: list[float] = []
        for r in range(HALF_KNEE_ROUNDS):
            await asyncio.gather(p_load.quiet(idle=0.5, limit=30), b_load.quiet(idle=0.5, limit=30))
            half = await _step(p_load, parley, "parley", 100 + r, half_rate, per_room, seconds)
            half["half_knee"] = True
            half["half_knee_round"] = r + 1
            half_latencies.extend(half["latencies"])
            half_p99s.append(half["p99_ms"])
            parley_steps.append(half)
    finally:
        await asyncio.gather(p_load.stop(), b_load.stop())
        bare.stop()

    below = [s for s in parley_steps if not _saturated(s) or s.get("half_knee")]
    past = [s for s in parley_steps if s not in below]
    p_knee_steps = [
        s for s in parley_steps if s["offered_per_s"] == p_knee and not s.get("half_knee")
    ]
    b_knee_steps = [s for s in bare_steps if s["offered_per_s"] == b_knee]
    out.update(
        {
            "parley_deliveries_per_s": parley_rate,
            "baseline_deliveries_per_s": bare_rate,
            "ratio": parley_rate / bare_rate,
            "ratio_rounds": [p / b for p, b in zip(p_rates, b_rates, strict=False)],
            "parley_knee_spread": summary(p_rates),
            "baseline_knee_spread": summary(b_rates),
            "knee_offered_per_s": {"parley": p_knee, "baseline": b_knee},
            "knee_rate_per_s": knee_rate,
            "half_knee_rate_per_s": half_rate,
            "p50_ms": percentile(half_latencies, 50) * 1000,
            "p99_ms": percentile(half_latencies, 99) * 1000,
            "half_knee_p99_rounds_ms": half_p99s,
            # Loss is judged where the server is not overloaded: every step below the
            # knee and the half-knee step. Past the knee it is reported on its own.
            "lost": sum(s["lost"] for s in below),
            "lost_past_knee": sum(s["lost"] for s in past),
            "duplicates": sum(s["duplicates"] for s in parley_steps),
            "out_of_order": sum(s["out_of_order"] for s in parley_steps),
            "closed_connections": sum(s["closed"] for s in parley_steps),
            "baseline_lost": sum(s["lost"] for s in bare_steps if not _saturated(s)),
            "baseline_duplicates": sum(s["duplicates"] for s in bare_steps),
            "baseline_out_of_order": sum(s["out_of_order"] for s in bare_steps),
            "server_cpu_s_per_step": [s["server_cpu_s"] for s in parley_steps],
            "baseline_cpu_s_per_step": [s["server_cpu_s"] for s in bare_steps],
            "parley_cpu_ms_per_1k_deliveries": _cpu_per_1k(p_knee_steps, "server_cpu_s"),
            "baseline_cpu_ms_per_1k_deliveries": _cpu_per_1k(b_knee_steps, "server_cpu_s"),
            "parley_knee_loadgen_cpu_ms_per_1k": _cpu_per_1k(p_knee_steps, "loadgen_cpu_s"),
            "baseline_knee_loadgen_cpu_ms_per_1k": _cpu_per_1k(b_knee_steps, "loadgen_cpu_s"),
            "parley_knee_server_cpu_util": statistics.median(
                s["server_cpu_util"] for s in p_knee_steps
            ),
            "baseline_knee_server_cpu_util": statistics.median(
                s["server_cpu_util"] for s in b_knee_steps
            ),
            "parley_knee_loadgen_cpu_util": statistics.median(
                s["loadgen_cpu_util"] for s in p_knee_steps
            ),
            "baseline_knee_loadgen_cpu_util": statistics.median(
                s["loadgen_cpu_util"] for s in b_knee_steps
            ),
            "knee_machine_cpu_util": statistics.median(
                s["machine_cpu_util"] for s in [*p_knee_steps, *b_knee_steps]
            ),
            "steps": [_without_latencies(s) for s in [*parley_steps, *bare_steps]],
            "sender": (
                f"WebSocket `send` op over {sender_connections} connection(s) per room, round-robin"
            ),
        }
    )
    return out


def _cpu_per_1k(steps: list[dict[str, Any]], key: str) -> float:
    """CPU milliseconds per 1000 deliveries (median over the steps)."""
    return float(statistics.median(1e6 * s[key] / max(s["deliveries"], 1) for s in steps))


async def run(quick: bool) -> dict[str, Any]:
    members_n = 500 if quick else 1000
    seconds = 3.0 if quick else 5.0
    async with fresh_database("fanout") as db:
        parley = await start_parley(
            db,
            name="parley-fanout",
            PARLEY_ACCESS_TOKEN_TTL="7200",  # noqa: S106 (a lifetime, not a secret)
            PARLEY_DB_POOL_SIZE="20",
        )
        try:
            t0 = time.monotonic()
            members = await register_users(parley.base, members_n, "fan", concurrency=32)
            senders = await register_users(parley.base, 1, "fansender")
            progress(f"fanout: {len(members)} members registered in {time.monotonic() - t0:.1f} s")
            results = await _run_size(
                parley,
                label="fanout",
                rooms_n=1,
                per_room=members_n,
                ladder=LADDER,
                seconds=seconds,
                sender_connections=SENDERS,
                members=members,
                senders=senders,
            )
            if not quick:
                room_senders = await register_users(parley.base, 100, "roomsender", concurrency=32)
                results["rooms_100x10"] = await _run_size(
                    parley,
                    label="rooms_100x10",
                    rooms_n=100,
                    per_room=10,
                    ladder=ROOMS_LADDER,
                    seconds=seconds,
                    sender_connections=1,
                    members=members[:1000],
                    senders=room_senders,
                )
        finally:
            parley.stop()
    results.update({"goal_ratio": 0.7, "goal_p99_ms": 100})
    progress(
        f"fanout: Parley {results['parley_deliveries_per_s']:,.0f} deliveries/s vs bare "
        f"{results['baseline_deliveries_per_s']:,.0f} (ratio {results['ratio']:.2f}); "
        "at half the knee "
        f"p50 {results['p50_ms']:.1f} ms p99 {results['p99_ms']:.1f} ms; lost {results['lost']}, "
        f"dup {results['duplicates']}, out of order {results['out_of_order']}"
    )
    return results
