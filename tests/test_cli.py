"""The `parley` command as an operator uses it: real subprocesses, real databases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from parley.app import create_app
from tests.conftest import Backend, make_settings

PARLEY = [sys.executable, "-m", "parley"]


def run(
    args: list[str], env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        PARLEY + args,
        env={**os.environ, **env, "PARLEY_LOG_FORMAT": "json"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'parley.db'}",
        "PARLEY_REDIS_URL": "",
        "PARLEY_ARGON2_TIME_COST": "1",
        "PARLEY_ARGON2_MEMORY_COST": "64",
    }


def test_python_dash_m_is_the_cli() -> None:
    result = subprocess.run([*PARLEY, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("serve", "migrate", "create-admin", "check-config"):
        assert command in result.stdout


def test_migrate_then_check_config(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    migrated = run(["migrate"], env)
    assert migrated.returncode == 0, migrated.stderr
    checked = run(["check-config"], env)
    assert checked.returncode == 0, checked.stderr
    assert "reachable" in checked.stdout
    assert "pending" not in checked.stdout


def test_check_config_fails_when_the_database_is_unreachable(tmp_path: Path) -> None:
    env = {**sqlite_env(tmp_path), "PARLEY_DATABASE_URL": "postgresql+asyncpg://x@127.0.0.1:1/x"}
    result = run(["check-config"], env)
    assert result.returncode == 1
    assert "NOT reachable" in result.stderr


def test_production_refuses_a_weak_secret(tmp_path: Path) -> None:
    env = {**sqlite_env(tmp_path), "PARLEY_ENV": "production", "PARLEY_SECRET_KEY": "short"}
    result = run(["check-config"], env)
    assert result.returncode == 2
    assert "PARLEY_SECRET_KEY" in result.stderr


async def _login(backend_url: str, data_dir: Path, username: str, password: str) -> httpx.Response:
    settings = make_settings(Backend("cli", backend_url, ""), data_dir)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        resp = await client.post(
            "/api/v1/auth/login", json={"username": username, "password": password}
        )
        return resp


async def test_create_admin_reads_the_password_from_stdin(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    result = run(["create-admin", "Root", "--password-stdin"], env, stdin="s3cret-admin-pw\n")
    assert result.returncode == 0, result.stderr
    assert "Created admin root" in result.stdout
    resp = await _login(env["PARLEY_DATABASE_URL"], tmp_path, "root", "s3cret-admin-pw")
    assert resp.status_code == 200, resp.text
    assert resp.json()["user"]["role"] == "admin"


async def test_create_admin_promotes_an_existing_user_from_a_password_file(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    assert (
        run(["create-admin", "ops", "--password-stdin"], env, stdin="first-password\n").returncode
        == 0
    )
    secret = tmp_path / "pw"
    secret.write_text("second-password\n")
    result = run(["create-admin", "ops", "--password-file", str(secret)], env)
    assert result.returncode == 0, result.stderr
    assert "Promoted admin ops" in result.stdout
    resp = await _login(env["PARLEY_DATABASE_URL"], tmp_path, "ops", "second-password")
    assert resp.status_code == 200


@pytest.mark.parametrize("args", [["--password", "hunter22"], ["-p", "hunter22"]])
def test_create_admin_never_takes_a_password_in_argv(tmp_path: Path, args: list[str]) -> None:
    result = run(["create-admin", "root", *args], sqlite_env(tmp_path))
    assert result.returncode != 0


def test_create_admin_refuses_a_short_password(tmp_path: Path) -> None:
    result = run(
        ["create-admin", "root", "--password-stdin"], sqlite_env(tmp_path), stdin="short\n"
    )
    assert result.returncode != 0


def test_serve_refuses_several_workers_without_redis(tmp_path: Path) -> None:
    result = run(["serve", "--workers", "2"], sqlite_env(tmp_path))
    assert result.returncode == 2
    assert "PARLEY_REDIS_URL" in result.stderr
