"""history: page latency in a small and a huge conversation (§11: p99 at 1,000,000
messages ≤ 1.3 × p99 at 10,000).

Four users and their group conversations are made through the API; then the messages
are bulk-loaded straight into PostgreSQL with COPY (sending a million through the API
would take the whole budget): a conversation of 10,000 messages, one of 1,000,000
(quick: 200,000) and the rest of the table, other conversations of mixed sizes, all
interleaved in time as a real table would be. Each message gets its `message.created`
row in the event log, the conversations their `last_seq`, and the tables are vacuumed and
analyzed.

Then a few closed-loop keep-alive clients (a minimal HTTP/1.1 client, so the client
costs little) fetch `GET /api/v1/conversations/{id}/messages?before=S&limit=50` at random
positions S, plus the newest page (no `before`). The two conversations' requests are
shuffled into one stream, so whatever else the machine does hits both alike, in rounds
(quick 5, full 7); each p99 is the median of the rounds' p99s. Every page is checked
(50 messages, ascending, ending at S-1). `EXPLAIN` of the SQL Parley itself issues for a
page (captured from `parley.messages.repository.page`) shows the plan: custom, and
generic as a reused prepared statement may get.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson

from bench.common import (
    BenchUser,
    Database,
    fresh_database,
    percentile,
    progress,
    register_users,
    start_parley,
)

PAGE = 50
CLIENTS = 4
NEWEST_SHARE = 0.1  # of the requests fetch the newest page (no `before`)
WARMUP = 60  # requests per conversation before measuring
# A p99 from one run on a shared 2-core machine is at the mercy of whatever else ran in
# that second. The measurement is repeated in rounds; each figure is the median of the
# rounds' p99s (as send.py takes the median of its repeats).
ROUNDS_QUICK = 5
ROUNDS_FULL = 7

TEXT = (
    "ok sure thanks see you tomorrow the build is green again can you review my pull "
    "request when you have a minute lunch at noon I pushed a fix for the flaky test "
    "deploying now meeting moved to three let me check and get back to you sounds good "
    "the customer reported a bug in the export screen has anyone seen this error before"
)


def _contents(rng: random.Random, count: int = 256) -> list[str]:
    """Chat-like lengths: mostly short, some long."""
    words = TEXT.split(" ")
    out = []
    for _ in range(count):
        n = min(int(rng.expovariate(1 / 12)) + 1, 120)
        out.append(" ".join(rng.choice(words) for _ in range(n)))
    return out


# -- loading -------------------------------------------------------------------------------


MESSAGE_COLUMNS = [
    "id", "conversation_id", "seq", "updated_seq", "sender_id", "content",
    "client_msg_id", "reply_to_id", "created_at", "edited_at", "deleted_at",
]  # fmt: skip
EVENT_COLUMNS = [
    "conversation_id", "seq", "type", "message_id", "user_id", "actor_id", "role", "data",
    "created_at",
]  # fmt: skip


async def _load(
    db: Database,
    sizes: dict[uuid.UUID, int],
    start_seq: dict[uuid.UUID, int],
    senders: dict[uuid.UUID, list[uuid.UUID]],
) -> dict[uuid.UUID, int]:
    """COPY the messages and their event-log rows; returns each conversation's last seq."""
    rng = random.Random(11)  # noqa: S311 (reproducible data, not a secret)
    ids = list(sizes)
    order: list[int] = []
    for i, cid in enumerate(ids):
        order += [i] * sizes[cid]
    rng.shuffle(order)  # interleaved in time, as conversations are in a real table
    total = len(order)
    contents = _contents(rng)
    seqs = [start_seq[cid] for cid in ids]
    sender_lists = [senders[cid] for cid in ids]
    t0 = datetime.now(UTC) - timedelta(days=365)
    step = timedelta(days=365) / max(total, 1)
    chunk = 50_000
    conn_m = await asyncpg.connect(**db.params)
    conn_e = await asyncpg.connect(**db.params)
    try:
        # Indexes that back no constraint (the trigram search index above all) are built
        # once after the load instead of row by row: the same definitions, from the
        # catalog, so whatever the migrations say is what gets measured.
        secondary = await conn_m.fetch(
            """
            SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def
            FROM pg_index i
            WHERE i.indrelid = 'messages'::regclass
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
            """
        )
        for row in secondary:
            await conn_m.execute(f"DROP INDEX {row['name']}")
        for conn in (conn_m, conn_e):
            # The rows are consistent by construction; skipping the per-row foreign-key
            # triggers makes COPY several times faster.
            await conn.execute("SET session_replication_role = replica")
        for start in range(0, total, chunk):
            messages: list[tuple[Any, ...]] = []
            events: list[tuple[Any, ...]] = []
            for n in range(start, min(start + chunk, total)):
                i = order[n]
                seqs[i] += 1
                seq = seqs[i]
                cid = ids[i]
                mid = uuid.uuid4()
                sender = sender_lists[i][n % len(sender_lists[i])]
                at = t0 + step * n
                messages.append(
                    (mid, cid, seq, seq, sender, contents[n & 255], None, None, at, None, None)
                )
                events.append((cid, seq, "message.created", mid, None, sender, None, None, at))
            await asyncio.gather(
                conn_m.copy_records_to_table("messages", records=messages, columns=MESSAGE_COLUMNS),
                conn_e.copy_records_to_table(
                    "conversation_events", records=events, columns=EVENT_COLUMNS
                ),
            )
            if (start // chunk) % 10 == 9:
                progress(f"history: loaded {start + len(messages):,}/{total:,} rows")
        started = time.monotonic()
        conns = (conn_m, conn_e)
        for conn in conns:
            await conn.execute("SET maintenance_work_mem = '256MB'")

        async def build(k: int) -> None:
            for row in secondary[k :: len(conns)]:
                await conns[k].execute(row["def"])

        await asyncio.gather(*(build(k) for k in range(len(conns))))
        progress(
            f"history: rebuilt {len(secondary)} secondary indexes "
            f"({', '.join(r['name'] for r in secondary)}) in {time.monotonic() - started:.1f} s"
        )
        last = {cid: seqs[i] for i, cid in enumerate(ids)}
        await conn_m.executemany(
            "UPDATE conversations SET last_seq = $2, last_activity_at = now() WHERE id = $1",
            list(last.items()),
        )
    finally:
        await conn_m.close()
        await conn_e.close()
    return last


async def _vacuum(db: Database) -> None:
    conn = await asyncpg.connect(**db.params)
    try:
        await conn.execute("VACUUM (ANALYZE) messages")
        await conn.execute("VACUUM (ANALYZE) conversation_events")
        await conn.execute("ANALYZE conversations")
        await conn.execute("ANALYZE memberships")
    finally:
        await conn.close()


# -- plans ---------------------------------------------------------------------------------


async def _parley_sql(db: Database, cid: uuid.UUID, before: int | None) -> tuple[str, list[Any]]:
    """The SQL (and parameters) that Parley's own history page runs for the messages."""
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from parley.messages import repository

    engine = create_async_engine(db.url)
    captured: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        if "FROM messages" in statement and not captured:
            captured.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", grab)
    try:
        async with AsyncSession(engine) as session:
            await repository.page(session, cid, before=before, after=None, limit=PAGE)
    except Exception as exc:  # the repository changed shape: fall back to its query
        progress(f"history: could not capture Parley's SQL ({exc}); explaining a copy")
        return _mirror_sql(cid, before)
    finally:
        await engine.dispose()
    if not captured:
        return _mirror_sql(cid, before)
    statement, parameters = captured[0]
    return statement, list(parameters)


def _mirror_sql(cid: uuid.UUID, before: int | None) -> tuple[str, list[Any]]:
    """The history page query as `parley.messages.repository.page` builds it."""
    from sqlalchemy import select
    from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg

    from parley.models import Message

    stmt = select(Message).where(Message.conversation_id == cid)
    if before is not None:
        stmt = stmt.where(Message.seq < before)
    stmt = stmt.order_by(Message.seq.desc()).limit(PAGE + 1)
    compiled = stmt.compile(dialect=pg_asyncpg.dialect())
    return str(compiled), [compiled.params[name] for name in compiled.positiontup or []]


def _nodes(plan: dict[str, Any]) -> list[str]:
    """The plan's nodes, top first, as 'Node Type (index name)'."""
    out = []

    def walk(node: dict[str, Any]) -> None:
        name = node["Node Type"]
        if "Index Name" in node:
            name += f" using {node['Index Name']}"
        if node.get("Scan Direction") == "Backward":
            name += " (backward)"
        out.append(name)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    return out


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool | int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def _explain(db: Database, sql: str, params: list[Any]) -> dict[str, Any]:
    conn = await asyncpg.connect(**db.params)
    try:
        custom = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *params)
        custom_plan = orjson.loads(custom)[0]
        # A prepared statement reused often enough may switch to a generic plan, one
        # made without the parameter values: see that one too.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE history_page AS " + sql)
        literals = ", ".join(_literal(p) for p in params)
        generic = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE history_page({literals})")
        generic_plan = orjson.loads(generic)[0]
    finally:
        await conn.close()
    nodes = _nodes(custom_plan["Plan"])
    generic_nodes = _nodes(generic_plan["Plan"])
    return {
        "top": nodes[0] if nodes[0] != "Limit" or len(nodes) < 2 else f"Limit → {nodes[1]}",
        "nodes": nodes,
        "uses_index": any("Index" in n for n in nodes) and not any("Seq Scan" in n for n in nodes),
        "execution_ms": custom_plan.get("Execution Time"),
        "shared_buffers_hit": custom_plan["Plan"].get("Shared Hit Blocks"),
        "shared_buffers_read": custom_plan["Plan"].get("Shared Read Blocks"),
        "generic_nodes": generic_nodes,
        "generic_uses_index": any("Index" in n for n in generic_nodes)
        and not any("Seq Scan" in n for n in generic_nodes),
    }


# -- requests ------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection doing GETs; cheap enough not to be the load."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {self.token}\r\nAccept: application/json\r\n\r\n"
            ).encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                body += await self.reader.readexactly(size + 2)
                del body[-2:]
            return status, bytes(body)
        return status, await self.reader.readexactly(length or 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check(status: int, body: bytes, before: int | None, last_seq: int) -> bool:
    if status != 200:
        return False
    page = orjson.loads(body)["messages"]
    top = (before if before is not None else last_seq + 1) - 1
    seqs = [m["seq"] for m in page]
    return len(seqs) == PAGE and seqs[-1] == top and seqs == list(range(top - PAGE + 1, top + 1))


Target = tuple[uuid.UUID, int, int]  # conversation, first message seq, last seq


def _empty(targets: dict[str, Target]) -> dict[str, dict[str, list[float]]]:
    return {k: {"before": [], "newest": []} for k in targets}


async def _mixed(
    clients: list[Client],
    targets: dict[str, Target],
    per_target: int,
    rng: random.Random,
    lat: dict[str, dict[str, list[float]]],
    bad: dict[str, list[int]],
) -> None:
    """`per_target` requests for each conversation, shuffled into one stream that the
    clients work through closed loop: whatever else the machine does meanwhile hits both
    conversations alike. About NEWEST_SHARE of them fetch the newest page."""
    jobs: list[tuple[str, int | None]] = []
    for label, (_, first, top) in targets.items():
        for _ in range(per_target):
            newest = rng.random() < NEWEST_SHARE
            jobs.append((label, None if newest else rng.randint(first + PAGE, top + 1)))
    rng.shuffle(jobs)

    async def worker(client: Client) -> None:
        while jobs:
            label, before = jobs.pop()
            cid, _, top = targets[label]
            path = f"/api/v1/conversations/{cid}/messages?limit={PAGE}"
            if before is not None:
                path += f"&before={before}"
            started = time.perf_counter()
            status, body = await client.get(path)
            elapsed = time.perf_counter() - started
            lat[label]["newest" if before is None else "before"].append(elapsed)
            if not _check(status, body, before, top):
                bad[label].append(status)

    await asyncio.gather(*(worker(c) for c in clients))


# -- the scenario --------------------------------------------------------------------------


async def _conversations(base: str, users: list[BenchUser], count: int) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for n in range(count):
            owner = users[n % len(users)]
            resp = await client.post(
                "/api/v1/conversations",
                json={
                    "kind": "group",
                    "name": f"history {n}",
                    "member_ids": [u.id for u in users if u is not owner],
                },
                headers=owner.headers,
            )
            resp.raise_for_status()
            ids.append(uuid.UUID(resp.json()["id"]))
    return ids


def _other_sizes(total: int, count: int, rng: random.Random) -> list[int]:
    """Mixed sizes (a few big, many small) summing to `total`."""
    weights = [rng.paretovariate(1.2) for _ in range(count)]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[0] += total - sum(sizes)
    return sizes


async def run(quick: bool) -> dict[str, Any]:
    small_size = 10_000
    large_size = 200_000 if quick else 1_000_000
    others_total = 190_000 if quick else 490_000
    others_count = 40 if quick else 100
    rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
    per_round = 400 if quick else 500  # requests per conversation per round
    rng = random.Random(5)  # noqa: S311 (reproducible positions)
    async with fresh_database("history") as db:
        server = await start_parley(db, name="parley-history")
        clients: list[Client] = []
        try:
            users = await register_users(server.base, 4, "hist")
            convs = await _conversations(server.base, users, 2 + others_count)
            small, large = convs[0], convs[1]
            sizes = {small: small_size, large: large_size}
            sizes.update(zip(convs[2:], _other_sizes(others_total, others_count, rng), strict=True))
            conn = await asyncpg.connect(**db.params)
            try:
                start_seq = dict(
                    await conn.fetch(
                        "SELECT id, last_seq FROM conversations WHERE id = ANY($1)", convs
                    )
                )
            finally:
                await conn.close()
            senders = {c: [uuid.UUID(u.id) for u in users] for c in convs}
            table_rows = sum(sizes.values())
            progress(f"history: loading {table_rows:,} messages with COPY")
            started = time.monotonic()
            last = await _load(db, sizes, start_seq, senders)
            load_s = time.monotonic() - started
            started = time.monotonic()
            await _vacuum(db)
            vacuum_s = time.monotonic() - started
            progress(f"history: loaded in {load_s:.1f} s, VACUUM ANALYZE {vacuum_s:.1f} s")

            plans = {}
            for label, cid in (("small", small), ("large", large)):
                mid = (start_seq[cid] + last[cid]) // 2
                sql, params = await _parley_sql(db, cid, mid)
                plans[label] = await _explain(db, sql, params)
                sql, params = await _parley_sql(db, cid, None)
                plans[f"{label}_newest"] = await _explain(db, sql, params)
            progress(
                f"history: plan {plans['large']['top']}, generic "
                f"{' → '.join(plans['large']['generic_nodes'][:2])}"
            )

            # The reader is a member that also sent a quarter of the messages.
            clients = [Client(server.port, users[0].token) for _ in range(CLIENTS)]
            targets: dict[str, Target] = {
                "small": (small, start_seq[small] + 1, last[small]),
                "large": (large, start_seq[large] + 1, last[large]),
            }
            bad: dict[str, list[int]] = {k: [] for k in targets}
            await _mixed(clients, targets, WARMUP, rng, _empty(targets), {k: [] for k in targets})
            cpu_before = server.cpu_seconds()
            started = time.monotonic()
            per: list[dict[str, dict[str, list[float]]]] = []
            for r in range(rounds):
                per.append(_empty(targets))
                await _mixed(clients, targets, per_round, rng, per[-1], bad)
                progress(
                    f"history: round {r + 1}/{rounds}: p99 "
                    f"{percentile(per[-1]['small']['before'], 99) * 1000:.1f} ms small, "
                    f"{percentile(per[-1]['large']['before'], 99) * 1000:.1f} ms large"
                )
            measure_s = time.monotonic() - started
            cpu = server.cpu_seconds() - cpu_before
        finally:
            for c in clients:
                c.close()
            server.stop()

    def ms(values: list[float], p: float) -> float:
        return round(percentile(values, p) * 1000, 2)

    lat = _empty(targets)  # all rounds pooled
    for one in per:
        for label, kinds in one.items():
            for kind, values in kinds.items():
                lat[label][kind] += values
    round_p99 = {k: [ms(one[k]["before"], 99) for one in per] for k in targets}
    p99_small = round(statistics.median(round_p99["small"]), 2)
    p99_large = round(statistics.median(round_p99["large"]), 2)
    total_requests = sum(len(v) for d in lat.values() for v in d.values())
    result = {
        "p99_small_ms": p99_small,
        "p99_large_ms": p99_large,
        "ratio": round(p99_large / p99_small, 3) if p99_small else float("nan"),
        "round_p99_small_ms": round_p99["small"],
        "round_p99_large_ms": round_p99["large"],
        "round_ratios": [
            round(b / a, 3) if a else None
            for a, b in zip(round_p99["small"], round_p99["large"], strict=True)
        ],
        "pooled_p99_small_ms": ms(lat["small"]["before"], 99),
        "pooled_p99_large_ms": ms(lat["large"]["before"], 99),
        "p50_small_ms": ms(lat["small"]["before"], 50),
        "p50_large_ms": ms(lat["large"]["before"], 50),
        "p90_small_ms": ms(lat["small"]["before"], 90),
        "p90_large_ms": ms(lat["large"]["before"], 90),
        "max_small_ms": ms(lat["small"]["before"], 100),
        "max_large_ms": ms(lat["large"]["before"], 100),
        "p99_newest_small_ms": ms(lat["small"]["newest"], 99),
        "p99_newest_large_ms": ms(lat["large"]["newest"], 99),
        "p50_newest_small_ms": ms(lat["small"]["newest"], 50),
        "p50_newest_large_ms": ms(lat["large"]["newest"], 50),
        "small_size": small_size,
        "large_size": large_size,
        "table_rows": table_rows,
        "requests": total_requests,
        "rounds": rounds,
        "bad_pages": {k: len(v) for k, v in bad.items()},
        "clients": CLIENTS,
        "requests_per_s": round(total_requests / measure_s, 1),
        "server_cpu_ms_per_page": round(1000 * cpu / max(total_requests, 1), 2),
        "plan": plans["large"]["top"],
        "plan_uses_index": all(p["uses_index"] for p in plans.values()),
        "plan_generic_uses_index": all(p["generic_uses_index"] for p in plans.values()),
        "plans": plans,
        "load_s": round(load_s, 1),
        "vacuum_analyze_s": round(vacuum_s, 1),
        "goal_ratio": 1.3,
    }
    progress(
        f"history: p99 {p99_small} ms at {small_size:,}, {p99_large} ms at {large_size:,} "
        f"(ratio {result['ratio']}), {result['requests_per_s']} pages/s, "
        f"bad pages {result['bad_pages']}"
    )
    return result
