"""§2 conventions that hold for every endpoint: auth on every route, problem+json for
every error, request ids, bounds, and an OpenAPI schema a client can generate from."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import Client, User, assert_problem

# The only operations an anonymous caller may use; everything else must answer 401.
ANONYMOUS_ALLOWED = {
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/login"),
    # These two take the refresh token itself as the credential.
    ("POST", "/api/v1/auth/refresh"),
    ("POST", "/api/v1/auth/logout"),
    # Protocol documentation, public like /openapi.json.
    ("GET", "/api/v1/realtime/schema"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/"),
}


def _operations(app: FastAPI) -> list[tuple[str, str]]:
    ops = []
    for path, item in app.openapi()["paths"].items():
        for method in item:
            ops.append((method.upper(), path))
    # Routes hidden from the schema are walked too.
    ops += [("GET", "/metrics"), ("GET", "/")]
    return ops


async def test_every_route_refuses_the_anonymous_caller(app: FastAPI) -> None:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    walked = 0
    for method, template in _operations(app):
        if (method, template) in ANONYMOUS_ALLOWED:
            continue
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), template)
        resp = await http.request(method, path, json={})
        assert resp.status_code == 401, f"{method} {template} answered {resp.status_code}"
        assert_problem(resp, 401)
        assert resp.headers.get("www-authenticate") == "Bearer"
        walked += 1
    assert walked >= 25  # the walk really covered the API


async def test_a_garbage_bearer_token_is_refused(app: FastAPI) -> None:
    resp = await Client(app, token="not-a-jwt").get("/auth/me")
    assert_problem(resp, 401, "unauthorized")


async def test_unknown_path_is_a_problem_404(anon: Client) -> None:
    assert_problem(await anon.get("/no/such/thing"), 404, "not_found")


async def test_wrong_method_is_a_problem_405(alice: User) -> None:
    assert_problem(await alice.put("/auth/me"), 405, "method_not_allowed")


async def test_malformed_json_is_a_problem_400(alice: User) -> None:
    resp = await alice.post(
        "/conversations",
        content=b'{"kind": "room", "name": ',
        headers={"content-type": "application/json"},
    )
    assert_problem(resp, 400, "malformed_json")


async def test_unknown_fields_are_rejected_and_named(alice: User) -> None:
    resp = await alice.post(
        "/conversations", json={"kind": "room", "name": "x", "owner_id": alice.id}
    )
    body = assert_problem(resp, 422, "validation_error")
    assert any(err["loc"][-1] == "owner_id" for err in body["errors"])


async def test_validation_errors_never_echo_input(anon: Client) -> None:
    resp = await anon.post(
        "/auth/register", json={"username": "x", "password": "hunter2-secret-but-short"[:5]}
    )
    body = assert_problem(resp, 422)
    assert "hunter" not in resp.text
    assert all(set(err) == {"loc", "msg", "type"} for err in body["errors"])


async def test_bad_uuid_in_path_is_422(alice: User) -> None:
    assert_problem(await alice.get("/conversations/not-a-uuid"), 422, "validation_error")
    assert_problem(await alice.get("/messages/123"), 422, "validation_error")


@pytest.mark.parametrize("limit", [0, 101, -1])
async def test_page_size_out_of_range_is_422(alice: User, limit: int) -> None:
    resp = await alice.get("/conversations", params={"limit": limit})
    assert_problem(resp, 422, "validation_error")


async def test_a_forged_cursor_is_422(alice: User) -> None:
    resp = await alice.get("/conversations", params={"cursor": "bm9wZQ"})
    assert_problem(resp, 422, "invalid_cursor")
    resp = await alice.get("/users", params={"cursor": "!!!"})
    assert_problem(resp, 422, "invalid_cursor")


async def test_request_id_is_echoed_or_generated(anon: Client) -> None:
    resp = await anon.get("/health", headers={"X-Request-ID": "client-chosen.42"})
    assert resp.headers["x-request-id"] == "client-chosen.42"
    generated = (await anon.get("/health")).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # Something that is not an id (here with spaces) is replaced, not reflected.
    resp = await anon.get("/health", headers={"X-Request-ID": "a b <script>"})
    assert resp.headers["x-request-id"] != "a b <script>"


async def test_errors_carry_the_request_id(anon: Client) -> None:
    resp = await anon.get("/auth/me", headers={"X-Request-ID": "trace-1"})
    assert assert_problem(resp, 401)["request_id"] == "trace-1"


async def test_an_oversized_body_is_413_and_nothing_is_written(
    alice: User, room: dict[str, Any]
) -> None:
    huge = {"content": "x" * 2_000_000}
    resp = await alice.post(f"/conversations/{room['id']}/messages", json=huge)
    assert_problem(resp, 413, "payload_too_large")
    after = (await alice.get(f"/conversations/{room['id']}")).json()
    assert after["last_seq"] == room["last_seq"] + 1  # only bob's join since the fixture


async def test_an_unexpected_error_is_a_problem_500(app: FastAPI) -> None:
    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
    )
    resp = await http.get("/boom")
    body = assert_problem(resp, 500, "internal_error")
    assert "kaboom" not in body["detail"]


def test_operation_ids_are_unique_and_readable(app: FastAPI) -> None:
    seen: set[str] = set()
    for path, item in app.openapi()["paths"].items():
        for method, op in item.items():
            op_id = op["operationId"]
            assert re.fullmatch(r"[a-z][a-z_]*", op_id), (method, path, op_id)
            assert op_id not in seen, op_id
            seen.add(op_id)


def test_every_operation_documents_its_errors(app: FastAPI) -> None:
    for path, item in app.openapi()["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        for method, op in item.items():
            responses = op["responses"]
            assert any(code.startswith("4") for code in responses), (method, path)
            if "requestBody" in op:
                assert "422" in responses, (method, path)
            problem = responses.get("401") or responses.get("422")
            assert problem is not None
            assert "application/problem+json" in problem["content"], (method, path)


async def test_health_and_readiness(anon: Client, backend_name: str) -> None:
    assert (await anon.get("/health")).json() == {"status": "ok"}
    ready = await anon.get("/ready")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    if backend_name == "postgres":
        assert checks["redis"] == "ok"


async def test_readiness_names_a_failing_database(app_factory: Any) -> None:
    broken = await app_factory(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    resp = await Client(broken).get("/ready")
    assert resp.status_code == 503
    assert resp.json()["failing"] == ["database"]


async def test_metrics_count_requests_by_route(anon: Client, alice: User) -> None:
    await alice.get("/auth/me")
    text = (await anon.get("/metrics")).text
    assert 'parley_http_requests_total{method="GET",route="/api/v1/auth/me",status="200"}' in text
    assert "parley_http_request_duration_seconds_bucket" in text


async def test_metrics_token_is_required_when_configured(app_factory: Any) -> None:
    app = await app_factory(metrics_token="m" * 20)
    client = Client(app)
    assert_problem(await client.get("/metrics"), 401)
    ok = await client.get("/metrics", headers={"Authorization": "Bearer " + "m" * 20})
    assert ok.status_code == 200


async def test_docs_can_be_switched_off(app_factory: Any) -> None:
    app = await app_factory(docs="off")
    client = Client(app)
    assert (await client.get("/docs")).status_code == 404
    assert (await client.get("/openapi.json")).status_code == 404
