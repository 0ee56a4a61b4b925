"""Settings: the §1 table of the spec, read from the environment or a `.env` file."""

from __future__ import annotations

import secrets
import sys
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

API_PREFIX = "/api/v1"
MIN_SECRET_CHARS = 32
# Keys that a careless operator might copy from an example; refused in production.
WEAK_SECRETS = frozenset({"changeme", "secret", "parley", "development", "test"})


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARLEY_", env_file=".env", extra="ignore", frozen=False
    )

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path("./parley-data")
    database_url: str = ""
    redis_url: str = ""
    secret_key: str = ""
    access_token_ttl: int = Field(900, ge=30, le=86_400)
    refresh_token_ttl: int = Field(2_592_000, ge=60)
    cors_origins: Annotated[list[str], NoDecode] = []
    ws_allowed_origins: Annotated[list[str] | None, NoDecode] = None
    max_upload_bytes: int = Field(10_485_760, ge=1)
    max_message_chars: int = Field(4000, ge=1, le=100_000)
    rate_limits: Literal["on", "off"] = "on"
    log_format: Literal["console", "json"] | None = None
    log_level: str = "INFO"
    forwarded_allow_ips: str = "127.0.0.1"
    metrics_token: str = ""
    max_connections_per_user: int = Field(20, ge=1)
    max_members: int = Field(10_000, ge=2)
    # §9.6: frames a connection may have queued before it is closed with 4008.
    ws_send_queue: int = Field(512, ge=8)
    docs: Literal["on", "off"] = "on"
    # Seconds between SIGTERM (when /ready turns 503) and closing the listener, so a
    # load balancer stops sending new requests first.
    shutdown_drain: float = Field(2.0, ge=0, le=60)
    # Argon2id cost. The defaults are pwdlib's (RFC 9106 second recommendation); the
    # test suite lowers them because it hashes hundreds of passwords.
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_cost: int = Field(65_536, ge=8)
    # The most PostgreSQL connections a process holds (opened on demand, kept).
    db_pool_size: int = Field(20, ge=1)
    # Namespace of every Redis key, so that several deployments (or test runs) can share
    # one Redis without meeting.
    redis_prefix: str = "parley"
    # With Redis: seconds after which a process that stopped refreshing (killed, hung)
    # counts as dead, and its users as offline. Processes refresh three times as often.
    presence_ttl: int = Field(30, ge=3, le=3600)
    login_rate: str = "10/minute"
    # §10: message sends per user (REST and WebSocket together) and API requests per
    # user. Generous for people, a wall for a runaway client.
    send_rate: str = "30/10 seconds"
    request_rate: str = "1200/minute"
    register_rate: str = "5/minute"

    @field_validator("cors_origins", "ws_allowed_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @model_validator(mode="after")
    def _production_secret(self) -> Settings:
        if self.env == "production":
            if not self.secret_key:
                raise ValueError("PARLEY_SECRET_KEY is required when PARLEY_ENV=production")
            if len(self.secret_key) < MIN_SECRET_CHARS or self.secret_key.lower() in WEAK_SECRETS:
                raise ValueError(
                    f"PARLEY_SECRET_KEY must be at least {MIN_SECRET_CHARS} characters "
                    "and not a well-known value"
                )
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'parley.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def effective_log_format(self) -> str:
        if self.log_format:
            return self.log_format
        return "console" if sys.stderr.isatty() else "json"

    @cached_property
    def signing_key(self) -> str:
        """The JWT key: configured, or generated once and kept in the data dir (development)."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret.key"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        # Created with 0600 before the key is written so it is never world-readable.
        path.touch(mode=0o600)
        path.write_text(key)
        return key


def get_settings() -> Settings:
    return Settings()
