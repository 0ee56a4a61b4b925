"""Settings (§1): production refuses weak secrets, development keeps a generated one."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from parley.config import Settings


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("secret", ["", "short", "changeme"])
def test_production_refuses_a_missing_or_weak_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="PARLEY_SECRET_KEY"):
        settings(env="production", secret_key=secret)


def test_production_accepts_a_long_secret() -> None:
    assert settings(env="production", secret_key="k" * 40).signing_key == "k" * 40


def test_development_generates_one_key_and_keeps_it(tmp_path: Path) -> None:
    first = settings(data_dir=tmp_path).signing_key
    key_file = tmp_path / "secret.key"
    assert key_file.read_text() == first
    assert len(first) >= 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert settings(data_dir=tmp_path).signing_key == first


def test_defaults_match_the_spec(tmp_path: Path) -> None:
    s = settings(data_dir=tmp_path)
    assert s.effective_database_url == f"sqlite+aiosqlite:///{tmp_path / 'parley.db'}"
    assert s.access_token_ttl == 900
    assert s.refresh_token_ttl == 2_592_000
    assert s.max_upload_bytes == 10_485_760
    assert s.max_message_chars == 4000
    assert s.max_connections_per_user == 20
    assert s.max_members == 10_000


def test_origins_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings(_env_file=None).cors_origins == ["https://a.example", "https://b.example"]  # type: ignore[call-arg]


def test_env_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("PARLEY_MAX_MESSAGE_CHARS=123\n")
    monkeypatch.chdir(tmp_path)
    assert Settings().max_message_chars == 123
