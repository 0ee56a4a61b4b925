"""Application-wide dependencies: settings and shared services held on `app.state`.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread
pool, a thread hop (and a GIL hand-off) on every request for a mere attribute read."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from parley.auth.security import PasswordHasher
from parley.config import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_hasher(request: Request) -> PasswordHasher:
    hasher: PasswordHasher = request.app.state.hasher
    return hasher


SettingsDep = Annotated[Settings, Depends(get_settings)]
HasherDep = Annotated[PasswordHasher, Depends(get_hasher)]
