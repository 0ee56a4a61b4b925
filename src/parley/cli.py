"""The `parley` command: serve · migrate · create-admin · check-config."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from parley.config import Settings

app = typer.Typer(
    name="parley",
    help="Parley: a self-hostable real-time chat backend.",
    no_args_is_help=True,
    add_completion=False,
)


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        typer.secho("Configuration error:", fg=typer.colors.RED, err=True)
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            typer.echo(f"  {where}: {error['msg']}", err=True)
        raise typer.Exit(2) from exc


def _migrate(settings: Settings) -> None:
    from parley.db.migrate import upgrade

    upgrade(settings.effective_database_url)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (>1 needs Redis)")] = 1,
) -> None:
    """Start the server (applies pending migrations first on SQLite)."""
    import uvicorn

    from parley.ops.server import uvicorn_options

    settings = _load_settings()
    if workers > 1 and not settings.redis_url:
        typer.secho(
            "--workers > 1 needs PARLEY_REDIS_URL: events must reach every process.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    if settings.is_sqlite:
        _migrate(settings)
    # Generate (or read) the development key once, before workers start, so that every
    # worker signs with the same key.
    _ = settings.signing_key
    shown = "localhost" if host in ("0.0.0.0", "::") else host  # noqa: S104 (display only)
    typer.echo(f"Parley {'on SQLite' if settings.is_sqlite else 'on PostgreSQL'}")
    typer.echo(f"  web page:  http://{shown}:{port}/")
    typer.echo(f"  API docs:  http://{shown}:{port}/docs")
    uvicorn.run(
        "parley.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        # Parley configures logging itself (JSON lines, secrets redacted).
        log_config=None,
        **uvicorn_options(settings),
    )


@app.command()
def migrate() -> None:
    """Apply pending Alembic migrations to the configured database."""
    settings = _load_settings()
    _migrate(settings)
    typer.echo("Database is up to date.")


def _read_password(password_stdin: bool, password_file: Path | None) -> str:
    if password_stdin and password_file:
        raise typer.BadParameter("Use --password-stdin or --password-file, not both")
    if password_file is not None:
        password = password_file.read_text().rstrip("\r\n")
    elif password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not 8 <= len(password) <= 256:
        raise typer.BadParameter("The password must have 8 to 256 characters")
    return password


@app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Argument(help="Username of the admin (created or promoted)")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input")
    ] = False,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="Read the password from a file")
    ] = None,
) -> None:
    """Create a global admin, or promote an existing user. Never takes a password in argv."""
    from parley.auth.schemas import RegisterIn

    settings = _load_settings()
    try:
        name = RegisterIn.model_validate({"username": username, "password": "x" * 8}).username
    except ValidationError as exc:
        raise typer.BadParameter("usernames are 3-32 of a-z 0-9 _ . -") from exc
    password = _read_password(password_stdin, password_file)
    if settings.is_sqlite:
        _migrate(settings)
    created = asyncio.run(_create_admin(settings, name, password))
    typer.echo(f"{'Created' if created else 'Promoted'} admin {name}.")


async def _create_admin(settings: Settings, username: str, password: str) -> bool:
    from parley.auth.repository import end_sessions
    from parley.auth.security import PasswordHasher
    from parley.auth.service import do_create_user
    from parley.db.session import Database
    from parley.users.repository import get_by_username

    db = Database(settings.effective_database_url)
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_cost
    )
    try:
        async with db.transaction() as session:
            user = await get_by_username(session, username)
            if user is not None:
                user.role = "admin"
                user.password_hash = await hasher.hash(password)
                user.is_active = True
                user.deactivated_at = None
                # A new password ends the sessions opened with the old one (§3).
                await end_sessions(session, user_id=user.id, reason="password_changed")
                return False
            await do_create_user(
                session, hasher, username=username, password=password, role="admin"
            )
            return True
    finally:
        await db.dispose()


@app.command("check-config")
def check_config() -> None:
    """Validate the configuration and reach the database and Redis."""
    settings = _load_settings()
    typer.echo(f"environment: {settings.env}")
    typer.echo(f"database:    {_redact(settings.effective_database_url)}")
    typer.echo(
        f"redis:       {_redact(settings.redis_url) if settings.redis_url else '(in-process)'}"
    )
    ok = asyncio.run(_check_services(settings))
    if not ok:
        raise typer.Exit(1)
    typer.secho("Configuration OK.", fg=typer.colors.GREEN)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


async def _check_services(settings: Settings) -> bool:
    from sqlalchemy import text

    from parley.db.migrate import pending_revisions
    from parley.db.session import Database

    ok = True
    db = Database(settings.effective_database_url)
    try:
        async with db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        pending = await pending_revisions(db.engine)
        typer.echo(
            "database:    reachable" + (f", pending migrations {pending}" if pending else "")
        )
    except Exception as exc:
        typer.secho(f"database:    NOT reachable ({type(exc).__name__}: {exc})", fg="red", err=True)
        ok = False
    finally:
        await db.dispose()
    if settings.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(settings.redis_url)
        try:
            await client.ping()
            typer.echo("redis:       reachable")
        except Exception as exc:
            typer.secho(f"redis:       NOT reachable ({type(exc).__name__})", fg="red", err=True)
            ok = False
        finally:
            await client.aclose()
    return ok
