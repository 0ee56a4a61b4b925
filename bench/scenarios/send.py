"""send: persisted HTTP sends/s on PostgreSQL, against the floor in the same run.

- Parley: N concurrent keep-alive connections, each a different user posting into its
  own room (`POST /api/v1/conversations/{id}/messages`), back to back.
- bare ASGI: the same load against a framework-free ASGI app that does one asyncpg
  INSERT per POST, under the same uvicorn settings.
- bare ASGI + send statement: the same app's POST /send runs Parley's own send statement
  (the database work of a plain Parley send, with no framework, token check,
  validation or publish around it): how much of the gap the database work alone makes.
- pgbench: a single-row INSERT script at the same concurrency on the same PostgreSQL,
  the database's own limit.
- pgbench running Parley's own send statement (parley.messages.repository.SEND_SQL),
  each client into its own room as Parley's senders: what PostgreSQL alone can do of
  the work a Parley send is, with no Python in the way. It is the ceiling of the
  Parley figure on this machine.

Each measurement is repeated; the JSON carries the median, the plot the spread.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import tempfile
from typing import Any

import asyncpg
import httpx
import jwt

from bench.common import (
    BenchUser,
    Database,
    free_port,
    fresh_database,
    percentile,
    progress,
    register_users,
    start_parley,
    start_process,
    summary,
)
from bench.loadgen import HttpTarget, http_closed_loop
from parley.messages.repository import SEND_SQL

# Connections left free for anything else while pgbench runs (monitoring, psql).
PGBENCH_SPARE_CONNECTIONS = 3

PGBENCH_SCRIPT = (
    "INSERT INTO bare_messages (id, conversation_id, content) "
    "VALUES (gen_random_uuid(), gen_random_uuid(), 'hello from pgbench');\n"
)


async def _measure(
    targets: list[HttpTarget], seconds: float, warmup: float, server: Any
) -> dict[str, Any]:
    cpu_before = server.cpu_seconds()
    result = await http_closed_loop(targets, seconds=seconds, warmup=warmup)
    cpu = server.cpu_seconds() - cpu_before
    return {
        "per_s": result.ok / seconds,
        "errors": result.errors,
        "p50_ms": percentile(result.latencies, 50) * 1000,
        "p99_ms": percentile(result.latencies, 99) * 1000,
        "server_cpu_s": cpu,
        "wall_s": seconds + warmup,
    }


async def _free_connections(db: Database) -> int:
    """How many more connections PostgreSQL accepts now (the servers' pools included)."""
    conn = await asyncpg.connect(**db.params, timeout=10)
    try:
        limit = int(await conn.fetchval("SHOW max_connections"))
        reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
        used = int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity"))
    finally:
        await conn.close()
    return limit - reserved - used


def send_statement_script() -> str:
    """Parley's send statement as a pgbench script: pgbench client n sends as the n-th
    sender into that sender's room (the send_targets table), a fresh message id each
    time. Its parameters come from one materialized row, as a prepared statement's
    would."""
    sql = SEND_SQL.replace(
        "WITH who AS",
        "WITH t AS MATERIALIZED (\n"
        "    SELECT uid, sid, cid, gen_random_uuid() AS mid, now() AS now\n"
        "    FROM send_targets WHERE client_id = :client_id\n"
        "), who AS",
        1,
    )
    values = {
        "uid": "(SELECT uid FROM t)",
        "sid": "(SELECT sid FROM t)",
        "cid": "(SELECT cid FROM t)",
        "mid": "(SELECT mid FROM t)",
        "now": "(SELECT now FROM t)",
        "content": "'hello'",
        "cmid": "NULL::text",
        "reply": "NULL::uuid",
    }
    sql = re.sub(r":(" + "|".join(values) + r")\b", lambda m: values[m[1]], sql)
    # pgbench reads a command up to its semicolon; comments would confuse it.
    lines = (line.split("--")[0].rstrip() for line in sql.splitlines())
    return "\n".join(line for line in lines if line) + ";\n"


async def _send_targets(db: Database, users: list[BenchUser], rooms: list[str]) -> None:
    conn = await asyncpg.connect(**db.params, timeout=10)
    try:
        await conn.execute(
            "CREATE TABLE send_targets (client_id int PRIMARY KEY, uid uuid, sid uuid, cid uuid)"
        )
        await conn.executemany(
            "INSERT INTO send_targets VALUES ($1, $2, $3, $4)",
            [
                (i, user.id, _session_id(user), room)
                for i, (user, room) in enumerate(zip(users, rooms, strict=True))
            ],
        )  # fmt: skip
    finally:
        await conn.close()


def _session_id(user: BenchUser) -> str:
    return str(jwt.decode(user.token, options={"verify_signature": False})["sid"])


async def _pgbench(
    db: Database,
    concurrency: int,
    seconds: int,
    script_text: str = PGBENCH_SCRIPT,
    *,
    prepared: bool = False,
) -> tuple[float, int]:
    """pgbench TPS at `concurrency` clients, or as many as PostgreSQL has room for (a
    default server allows 100 connections, fewer than the full run's 128); (tps, clients)."""
    clients = min(concurrency, await _free_connections(db) - PGBENCH_SPARE_CONNECTIONS)
    params = db.params
    # The script lives as long as this block: pgbench reads it by name.
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(script_text)
        script.flush()
        args = [
            "pgbench",
            "-n",
            "-h", params["host"],
            "-p", str(params["port"]),
            "-U", params["user"],
            "-c", str(clients),
            "-j", str(min(clients, 2)),
            "-T", str(seconds),
            "-M", "prepared" if prepared else "simple",
            "-f", script.name,
            params["database"],
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
    match = re.search(rb"tps = ([0-9.]+)", out)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {err.decode()[-500:]}")
    return float(match.group(1)), clients


async def run(quick: bool) -> dict[str, Any]:
    levels = [32] if quick else [1, 8, 32, 128]
    repeats = 3
    seconds, warmup = (5.0, 1.5) if quick else (10.0, 2.0)
    results: dict[str, Any] = {"levels": {}}
    async with fresh_database("send") as db:
        parley = await start_parley(db, name="parley-send", PARLEY_DB_POOL_SIZE="20")
        bare_port = free_port()
        bare = await start_process(
            "bare-asgi",
            [sys.executable, "-m", "bench.baselines.bare_asgi", "--port", str(bare_port),
             "--dsn", db.dsn, "--pool-size", "20"],
        )  # fmt: skip
        try:
            users = await register_users(parley.base, max(levels), "sender")
            rooms = []
            async with httpx.AsyncClient(base_url=parley.base, timeout=30) as client:
                for user in users:
                    resp = await client.post(
                        "/api/v1/conversations",
                        json={"kind": "room", "name": f"room of {user.username}"},
                        headers=user.headers,
                    )
                    resp.raise_for_status()
                    rooms.append(resp.json()["id"])
            await _send_targets(db, users, rooms)
            statement = send_statement_script()
            for level in levels:
                parley_targets = [
                    HttpTarget(parley.port, f"/api/v1/conversations/{rooms[i]}/messages",
                               users[i].token, [{"content": "hello"}])
                    for i in range(level)
                ]  # fmt: skip
                bare_targets = [
                    HttpTarget(bare.port, "/messages", None,
                               [{"conversation_id": rooms[i], "content": "hello"}])
                    for i in range(level)
                ]  # fmt: skip
                bare_send_targets = [
                    HttpTarget(bare.port, "/send", None,
                               [{"uid": str(users[i].id), "sid": _session_id(users[i]),
                                 "cid": rooms[i], "content": "hello"}])
                    for i in range(level)
                ]  # fmt: skip
                runs: dict[str, list[dict[str, Any]]] = {"parley": [], "bare": [], "bare_send": []}
                pg_tps: list[float] = []
                pg_clients: list[int] = []
                statement_tps: list[float] = []
                for r in range(repeats):
                    progress(f"send: concurrency {level}, round {r + 1}/{repeats}")
                    runs["bare"].append(await _measure(bare_targets, seconds, warmup, bare))
                    runs["parley"].append(await _measure(parley_targets, seconds, warmup, parley))
                    runs["bare_send"].append(
                        await _measure(bare_send_targets, seconds, warmup, bare)
                    )
                    tps, clients = await _pgbench(db, level, int(seconds))
                    pg_tps.append(tps)
                    pg_clients.append(clients)
                    tps, clients = await _pgbench(db, level, int(seconds), statement, prepared=True)
                    statement_tps.append(tps)
                    pg_clients.append(clients)
                results["levels"][str(level)] = _summarize(runs, pg_tps, statement_tps)
                results["levels"][str(level)]["pgbench_clients"] = min(pg_clients)
                level_result = results["levels"][str(level)]
                progress(
                    f"send: c={level} parley {level_result['parley_per_s']:.0f}/s, "
                    f"bare {level_result['baseline_per_s']:.0f}/s, "
                    f"bare + send statement {level_result['bare_send_statement_per_s']:.0f}/s, "
                    f"pgbench {level_result['pgbench_tps']:.0f} tps, "
                    f"pgbench send statement {level_result['pgbench_send_statement_tps']:.0f} tps "
                    f"({level_result['pgbench_clients']} clients), "
                    f"ratio {level_result['ratio']:.2f}"
                )
        finally:
            parley.stop()
            bare.stop()
    headline = results["levels"]["32"]
    results.update(
        {
            "parley_per_s": headline["parley_per_s"],
            "baseline_per_s": headline["baseline_per_s"],
            "pgbench_tps": headline["pgbench_tps"],
            "ratio": headline["ratio"],
            "vs_pgbench": headline["vs_pgbench"],
            "pgbench_send_statement_tps": headline["pgbench_send_statement_tps"],
            "vs_send_statement": headline["vs_send_statement"],
            "bare_send_statement_per_s": headline["bare_send_statement_per_s"],
            "bare_send_statement_ratio": headline["bare_send_statement_ratio"],
            "p50_ms": headline["parley_p50_ms"],
            "p99_ms": headline["parley_p99_ms"],
            "goal": 0.5,
        }
    )
    return results


def _summarize(
    runs: dict[str, list[dict[str, Any]]], pg_tps: list[float], statement_tps: list[float]
) -> dict[str, Any]:
    parley = [r["per_s"] for r in runs["parley"]]
    bare = [r["per_s"] for r in runs["bare"]]
    bare_send = [r["per_s"] for r in runs["bare_send"]]
    ratios = [p / b for p, b in zip(parley, bare, strict=True) if b]
    # Measured in the same round as the bare INSERT it is divided by.
    bare_send_ratios = [s / b for s, b in zip(bare_send, bare, strict=True) if b]
    statement_median = statistics.median(statement_tps)
    return {
        "parley_per_s": statistics.median(parley),
        "baseline_per_s": statistics.median(bare),
        "pgbench_tps": statistics.median(pg_tps),
        "ratio": statistics.median(ratios),
        "vs_pgbench": statistics.median(parley) / statistics.median(pg_tps),
        "ratio_spread": summary(ratios),
        "parley_spread": summary(parley),
        "baseline_spread": summary(bare),
        "pgbench_spread": summary(pg_tps),
        "pgbench_send_statement_tps": statement_median,
        "pgbench_send_statement_spread": summary(statement_tps),
        "vs_send_statement": statistics.median(parley) / statement_median,
        "bare_send_statement_per_s": statistics.median(bare_send),
        "bare_send_statement_spread": summary(bare_send),
        "bare_send_statement_ratio": statistics.median(bare_send_ratios),
        "bare_send_statement_ratio_spread": summary(bare_send_ratios),
        "vs_bare_send_statement": statistics.median(parley) / statistics.median(bare_send),
        "parley_p50_ms": statistics.median(r["p50_ms"] for r in runs["parley"]),
        "parley_p99_ms": statistics.median(r["p99_ms"] for r in runs["parley"]),
        "baseline_p50_ms": statistics.median(r["p50_ms"] for r in runs["bare"]),
        "baseline_p99_ms": statistics.median(r["p99_ms"] for r in runs["bare"]),
        "parley_cpu_s_per_1k": 1000
        * statistics.median(
            r["server_cpu_s"] / max(r["per_s"] * r["wall_s"], 1) for r in runs["parley"]
        ),
        "baseline_cpu_s_per_1k": 1000
        * statistics.median(
            r["server_cpu_s"] / max(r["per_s"] * r["wall_s"], 1) for r in runs["bare"]
        ),
        "bare_send_statement_cpu_s_per_1k": 1000
        * statistics.median(
            r["server_cpu_s"] / max(r["per_s"] * r["wall_s"], 1) for r in runs["bare_send"]
        ),
        "errors": sum(r["errors"] for rs in runs.values() for r in rs),
    }
