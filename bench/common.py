"""What every scenario shares: a fresh PostgreSQL database, servers in subprocesses,
process CPU and memory readings, percentiles and progress lines.

Every figure Parley reports is a ratio against a baseline measured in the same run on
the same machine, so a noisy or slow machine moves both sides together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG_URL = os.environ.get(
    "PARLEY_BENCH_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PARLEY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]
STARTED = time.monotonic()


def progress(message: str) -> None:
    elapsed = time.monotonic() - STARTED
    print(f"[{elapsed:7.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


# -- PostgreSQL -------------------------------------------------------------------------


def _pg_params(url: str) -> dict[str, Any]:
    u = make_url(url)
    return {
        "host": u.host or "127.0.0.1",
        "port": u.port or 5432,
        "user": u.username or "postgres",
        "password": u.password,
        "database": u.database or "postgres",
    }


async def pg_execute(sql: str, url: str = PG_URL) -> None:
    conn = await asyncpg.connect(**_pg_params(url), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Database:
    """A database of this run's own, dropped at the end."""

    name: str
    url: str  # postgresql+asyncpg://…

    @property
    def dsn(self) -> str:
        """Plain libpq form for asyncpg and pgbench."""
        return make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    @property
    def params(self) -> dict[str, Any]:
        return _pg_params(self.url)


@contextlib.asynccontextmanager
async def fresh_database(label: str, *, migrate: bool = True) -> AsyncIterator[Database]:
    name = f"parley_bench_{RUN_ID}_{label}"
    await pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await pg_execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    db = Database(name, url)
    try:
        if migrate:
            from parley.db.migrate import upgrade

            await asyncio.to_thread(upgrade, url)
        yield db
    finally:
        await pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- servers ----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process and its children."""
        total = 0.0
        for proc in [self.ps, *self.ps.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        total = 0
        for proc in [self.ps, *self.ps.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_http(url: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code < 500:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {within} s")


def parley_env(db: Database, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PARLEY_ENV": "production",
        "PARLEY_SECRET_KEY": "bench-secret-" + "k" * 40,
        "PARLEY_DATABASE_URL": db.url,
        "PARLEY_REDIS_URL": REDIS_URL,
        "PARLEY_REDIS_PREFIX": f"parley-bench-{RUN_ID}-{uuid.uuid4().hex[:6]}",
        # Benchmarks measure throughput, not the limits that protect it (§1).
        "PARLEY_RATE_LIMITS": "off",
        "PARLEY_MAX_CONNECTIONS_PER_USER": "100000",
        "PARLEY_LOG_LEVEL": "WARNING",
        "PARLEY_LOG_FORMAT": "json",
        # A cheaper hash keeps user setup short; no scenario measures logins.
        "PARLEY_ARGON2_TIME_COST": "1",
        "PARLEY_ARGON2_MEMORY_COST": "1024",
        **extra,
    }


def _spawn(
    args: list[str], env: dict[str, str], log_path: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    """Start a server that outlives this call (Server.stop ends it), its stderr in a log.

    A plain Popen: the servers are stopped from synchronous cleanup, and starting one is
    a fork and exec, once per scenario, before anything is measured."""
    with log_path.open("wb") as log:
        # The command lines are the bench's own, never outside input.
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=cwd)  # noqa: S603


async def start_parley(db: Database, *, name: str = "parley", **env: str) -> Server:
    port = free_port()
    log_path = RESULTS / f"{name}.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    proc = _spawn(
        [sys.executable, "-m", "parley", "serve", "--port", str(port)],
        parley_env(db, **env),
        log_path,
        RESULTS,
    )
    server = Server(name, port, proc, log_path)
    try:
        await wait_http(f"{server.base}/ready")
    except Exception:
        server.stop()
        raise
    return server


async def start_process(
    name: str, args: list[str], *, env: dict[str, str] | None = None, ready_url: str | None = None
) -> Server:
    """A baseline server: any command that listens on the port given in args."""
    port = int(next(a for a in args if a.isdigit()))
    log_path = RESULTS / f"{name}.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    proc = _spawn(args, {**os.environ, **(env or {})}, log_path, ROOT)
    server = Server(name, port, proc, log_path)
    if ready_url:
        try:
            await wait_http(ready_url)
        except Exception:
            server.stop()
            raise
    else:
        await wait_port(port)
    return server


async def wait_port(port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {within} s")


# -- users ------------------------------------------------------------------------------


@dataclass
class BenchUser:
    id: str
    username: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def register_users(
    base: str, count: int, prefix: str, *, concurrency: int = 16
) -> list[BenchUser]:
    users: list[BenchUser | None] = [None] * count
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def one(i: int) -> None:
            async with sem:
                name = f"{prefix}{i}"
                resp = await client.post(
                    "/api/v1/auth/register", json={"username": name, "password": "bench-password"}
                )
                resp.raise_for_status()
                body = resp.json()
                users[i] = BenchUser(body["user"]["id"], name, body["access_token"])

        await asyncio.gather(*(one(i) for i in range(count)))
    return [u for u in users if u is not None]


async def create_groups(
    base: str, plans: list[list[BenchUser]], name: str, *, concurrency: int = 8
) -> list[str]:
    """One group per plan, created by its first member with the others as members;
    the ids in the order of `plans`."""
    ids: list[str | None] = [None] * len(plans)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def create(n: int, members: list[BenchUser]) -> None:
            async with sem:
                resp = await client.post(
                    "/api/v1/conversations",
                    json={
                        "kind": "group",
                        "name": f"{name} {n}",
                        "member_ids": [m.id for m in members[1:]],
                    },
                    headers=members[0].headers,
                )
                resp.raise_for_status()
                ids[n] = resp.json()["id"]

        await asyncio.gather(*(create(n, m) for n, m in enumerate(plans)))
    return [i for i in ids if i is not None]


# -- load-generator processes that keep state between steps ----------------------------


def _workers_main(pipe: Any, module: str) -> None:
    import importlib

    import uvloop

    handlers = importlib.import_module(module)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {}
        while True:
            command, arg = await loop.run_in_executor(None, pipe.recv)
            if command is None:
                return
            try:
                result = await getattr(handlers, f"cmd_{command}")(state, arg)
                pipe.send(("ok", result))
            except Exception as exc:  # reported to the parent, which raises it
                pipe.send(("error", f"{type(exc).__name__}: {exc}"))

    uvloop.run(serve())


class Workers:
    """`count` child processes (spawned), each running one uvloop event loop with a state
    of its own that lives across steps. `await workers.call("x", args)` runs
    `<module>.cmd_x(state, args[i])` in worker i, all at once, and returns the results.

    For multi-step load (connect, hold, disconnect, reconnect) that a one-shot process
    pool cannot express."""

    def __init__(self, count: int, module: str) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for _ in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=_workers_main, args=(child, module), daemon=True)
            proc.start()
            child.close()  # so a worker that dies shows as EOFError, not a hang
            self.pipes.append(parent)
            self.procs.append(proc)
        self.ps = [psutil.Process(p.pid) for p in self.procs]

    def __len__(self) -> int:
        return len(self.procs)

    async def call(self, command: str, args: Sequence[Any]) -> list[Any]:
        assert len(args) == len(self.pipes)
        for pipe, arg in zip(self.pipes, args, strict=True):
            pipe.send((command, arg))
        replies = await asyncio.gather(*(asyncio.to_thread(pipe.recv) for pipe in self.pipes))
        errors = [detail for status, detail in replies if status != "ok"]
        if errors:
            raise RuntimeError(f"worker {command} failed: {errors[0]}")
        return [result for _, result in replies]

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.ps:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def close(self) -> None:
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            with contextlib.suppress(Exception):
                if proc.is_alive():
                    pipe.send((None, None))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


async def live_connections(base: str) -> int:
    """The server's own count of live WebSocket and SSE connections (/metrics)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{base}/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("parley_live_connections{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)
