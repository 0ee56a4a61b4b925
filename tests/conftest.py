"""Fixtures: one database per backend per run, a fresh app per test, named users.

The suite runs on SQLite always, and on PostgreSQL + Redis when PARLEY_TEST_DATABASE_URL
and PARLEY_TEST_REDIS_URL are set. Configured services that do not answer stop the run
with an error: they are never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import websockets
import websockets.asyncio.client
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from parley.app import create_app
from parley.auth.service import Principal, access_principal_by_token
from parley.config import Settings
from parley.db.base import Base
from parley.db.migrate import upgrade
from parley.ops.server import uvicorn_options

PG_URL = os.environ.get("PARLEY_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("PARLEY_TEST_REDIS_URL", "")
BACKENDS = ["sqlite"] + (["postgres"] if PG_URL else [])
RUN_ID = uuid.uuid4().hex[:10]
PASSWORD = "correct horse battery"


def pytest_sessionstart(session: pytest.Session) -> None:
    problems = []
    if PG_URL:
        try:
            asyncio.run(_pg_admin("SELECT 1"))
        except Exception as exc:
            problems.append(f"PostgreSQL at PARLEY_TEST_DATABASE_URL does not answer: {exc!r}")
    if REDIS_URL:
        import redis

        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
        except Exception as exc:
            problems.append(f"Redis at PARLEY_TEST_REDIS_URL does not answer: {exc!r}")
    if problems:
        pytest.exit("\n".join(problems), returncode=3)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Leave the shared Redis as found: delete this run's keys (its own prefix only).

    Presence and rate-limit keys outlive an app that stopped without logging out."""
    if REDIS_URL:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        try:
            keys = list(client.scan_iter(match=f"parley-test-{RUN_ID}-*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


async def _pg_admin(sql: str) -> None:
    import asyncpg

    url = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=url.database or "postgres",
        timeout=5,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    redis_url: str

    @property
    def is_postgres(self) -> bool:
        return self.name == "postgres"


@pytest.fixture(scope="session", params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "parley.db"
        url = f"sqlite+aiosqlite:///{path}"
        upgrade(url)
        yield Backend("sqlite", url, "")
        return
    # A database of our own for this run, dropped at the end.
    name = f"parley_test_{RUN_ID}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield Backend("postgres", url, REDIS_URL)
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def make_settings(backend: Backend, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": backend.url,
        "redis_url": backend.redis_url,
        "redis_prefix": f"parley-test-{RUN_ID}-{uuid.uuid4().hex[:6]}",
        "data_dir": data_dir,
        "secret_key": "test-secret-key-" + "x" * 32,
        # Hundreds of passwords are hashed per run; the cost is lowered, not the algorithm.
        "argon2_time_cost": 1,
        "argon2_memory_cost": 64,
        "rate_limits": "off",
        "log_format": "json",
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def truncate_all(app: FastAPI) -> None:
    db = app.state.db
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with db.engine.begin() as conn:
        if db.is_postgres:
            await conn.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))
        else:
            for table in tables:
                await conn.execute(text(f"DELETE FROM {table}"))


AppFactory = Callable[..., Awaitable[FastAPI]]


@pytest.fixture
async def app_factory(backend: Backend, tmp_path: Path) -> AsyncIterator[AppFactory]:
    """Builds apps on the test database with settings overridden; all share one data dir."""
    stacks: list[Any] = []

    async def build(**overrides: Any) -> FastAPI:
        app = create_app(make_settings(backend, tmp_path, **overrides))
        context = app.router.lifespan_context(app)
        await context.__aenter__()
        stacks.append(context)
        return app

    yield build
    for context in reversed(stacks):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def app(app_factory: AppFactory) -> FastAPI:
    app = await app_factory()
    await truncate_all(app)
    return app


@pytest.fixture
def backend_name(backend: Backend) -> str:
    return backend.name


class Client:
    """An HTTP client for one caller: anonymous, or a user with their tokens."""

    def __init__(self, app: FastAPI, token: str | None = None) -> None:
        self.app = app
        self.token = token
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test/api/v1/"
        )

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        merged = dict(headers or {})
        if self.token and "Authorization" not in merged:
            merged["Authorization"] = f"Bearer {self.token}"
        return merged

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        kwargs["headers"] = self._headers(kwargs.get("headers"))
        if path.startswith(("/health", "/ready", "/metrics", "/docs", "/openapi", "/redoc")):
            path = "http://test" + path
        return await self.http.request(method, path, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)


@dataclass
class User(Client):
    """A registered user acting through the API."""

    app: FastAPI
    id: str
    username: str
    password: str
    access_token: str
    refresh_token: str
    body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Client.__init__(self, self.app, self.access_token)


UserFactory = Callable[..., Awaitable[User]]


@pytest.fixture
async def anon(app: FastAPI) -> Client:
    return Client(app)


@pytest.fixture
async def make_user(app: FastAPI, anon: Client) -> UserFactory:
    counter = 0

    async def make(username: str | None = None, password: str = PASSWORD, **fields: Any) -> User:
        nonlocal counter
        counter += 1
        username = username or f"user{counter}"
        resp = await anon.post(
            "/auth/register", json={"username": username, "password": password, **fields}
        )
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return User(
            app=app,
            id=body["user"]["id"],
            username=body["user"]["username"],
            password=password,
            access_token=body["access_token"],
            refresh_token=body["refresh_token"],
            body=body,
        )

    return make


@pytest.fixture
async def alice(make_user: UserFactory) -> User:
    return await make_user("alice", display_name="Alice Liddell")


@pytest.fixture
async def bob(make_user: UserFactory) -> User:
    return await make_user("bob", display_name="Bob")


@pytest.fixture
async def carol(make_user: UserFactory) -> User:
    """The outsider: a user who is in none of the fixtures' conversations."""
    return await make_user("carol")


@pytest.fixture
async def dave(make_user: UserFactory) -> User:
    return await make_user("dave")


@pytest.fixture
async def admin(app: FastAPI, make_user: UserFactory) -> User:
    user = await make_user("root")
    async with app.state.db.transaction() as session:
        await session.execute(text("UPDATE users SET role = 'admin' WHERE username = 'root'"))
    return user


@pytest.fixture
async def room(alice: User, bob: User) -> dict[str, Any]:
    """A public room owned by alice that bob has joined."""
    resp = await alice.post("/conversations", json={"kind": "room", "name": "general"})
    assert resp.status_code == 201, resp.text
    conversation = resp.json()
    resp = await bob.post(f"/conversations/{conversation['id']}/join")
    assert resp.status_code == 200, resp.text
    return conversation


@pytest.fixture
async def group(alice: User, bob: User) -> dict[str, Any]:
    """A private group owned by alice with bob as a member."""
    resp = await alice.post(
        "/conversations", json={"kind": "group", "name": "team", "member_ids": [bob.id]}
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture
async def direct(alice: User, bob: User) -> dict[str, Any]:
    """The direct conversation of alice and bob."""
    resp = await alice.post("/conversations/direct", json={"user_id": bob.id})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def send(
    user: Client, conversation_id: str, content: str = "hello", **fields: Any
) -> dict[str, Any]:
    resp = await user.post(
        f"/conversations/{conversation_id}/messages", json={"content": content, **fields}
    )
    assert resp.status_code in (200, 201), resp.text
    body: dict[str, Any] = resp.json()
    return body


async def principal_of(session: AsyncSession, app: FastAPI, user: User) -> Principal:
    """The user as the service layer sees the caller of an authenticated request."""
    return await access_principal_by_token(session, app.state.settings, user.access_token)


def assert_problem(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A problem+json error with every field §2 names."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body: dict[str, Any] = resp.json()
    for key in ("type", "title", "status", "detail", "code", "request_id"):
        assert key in body, body
    assert body["status"] == status
    assert body["request_id"] == resp.headers["x-request-id"]
    if code is not None:
        assert body["code"] == code, body
    if status == 422 and body["code"] == "validation_error":
        assert isinstance(body.get("errors"), list)
    return body


def assert_hidden(resp: httpx.Response, unknown: httpx.Response) -> None:
    """A 404 for something the caller may not see, identical to one for a missing id."""
    hidden = assert_problem(resp, 404, "not_found")
    missing = assert_problem(unknown, 404, "not_found")
    hidden.pop("request_id")
    missing.pop("request_id")
    assert hidden == missing


# -- live servers and real-time clients -----------------------------------------------


@dataclass
class LiveServer:
    """The app served by a real uvicorn on a free loopback port, in this event loop."""

    app: FastAPI
    port: int

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ws_url(self, path: str = "/ws", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"ws://{self.base}/api/v1{path}" + (f"?{query}" if query else "")

    async def connect(self, user: User | None, path: str = "/ws", **kwargs: Any) -> WS:
        params = {"token": user.access_token} if user is not None else {}
        ws = await websockets.asyncio.client.connect(
            self.ws_url(path, **params), open_timeout=5, **kwargs
        )
        return WS(ws)


class WS:
    """A WebSocket client that reads JSON events."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, **op: Any) -> None:
        await self.ws.send(orjson.dumps(op).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        event: dict[str, Any] = orjson.loads(raw)
        return event

    async def until(
        self, type_: str, timeout: float = 5.0
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Read until an event of this type; it and everything read before it."""
        seen: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            event = await self.recv(max(left, 0.01))
            if event["type"] == type_:
                return event, seen
            seen.append(event)

    async def ready(self) -> dict[str, Any]:
        event = await self.recv()
        assert event["type"] == "ready", event
        return event

    async def quiet(self, seconds: float = 0.3) -> list[dict[str, Any]]:
        """Whatever arrives within `seconds` (expected: nothing)."""
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(await self.recv(seconds))
        return got

    async def closed_with(self, timeout: float = 5.0) -> int | None:
        with contextlib.suppress(TimeoutError, websockets.exceptions.ConnectionClosed):
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        return self.ws.close_code  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.ws.close()


LiveFactory = Callable[..., Awaitable[LiveServer]]


@pytest.fixture
async def live_factory() -> AsyncIterator[LiveFactory]:
    servers: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(app: FastAPI, **overrides: Any) -> LiveServer:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_level="warning",
            **{**uvicorn_options(app.state.settings), **overrides},
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        servers.append((server, task))
        return LiveServer(app, port)

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


@pytest.fixture
async def live(app: FastAPI, live_factory: LiveFactory) -> LiveServer:
    return await live_factory(app)
