from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, EmailStr, Field

from parley.models import User
from parley.schemas import StrictModel

DELETED_USERNAME = "deleted-user"
DELETED_DISPLAY_NAME = "Deleted user"


class UserOut(BaseModel):
    id: uuid.UUID
    username: str
    display_name: str | None
    role: Literal["user", "admin"]
    created_at: datetime
    updated_at: datetime
    # Only on the caller's own user.
    email: str | None = Field(default=None)

    @classmethod
    def of(cls, user: User, *, me: bool = False) -> UserOut:
        return cls(
            id=user.id,
            username=user.username,
            display_name=user.display_name,
            role=user.role,  # type: ignore[arg-type]
            created_at=user.created_at,
            updated_at=user.updated_at,
            email=user.email if me else None,
        )


class AdminUserOut(UserOut):
    is_active: bool

    @classmethod
    def of_admin(cls, user: User) -> AdminUserOut:
        return cls(
            id=user.id,
            username=user.username,
            display_name=user.display_name,
            role=user.role,  # type: ignore[arg-type]
            created_at=user.created_at,
            updated_at=user.updated_at,
            email=user.email,
            is_active=user.is_active,
        )


class UserRef(BaseModel):
    """How a message names its sender; a deactivated sender shows as a deleted user."""

    id: uuid.UUID
    username: str
    display_name: str | None


class UserList(BaseModel):
    users: list[UserOut]
    next_cursor: str | None


class AdminUserList(BaseModel):
    users: list[AdminUserOut]
    next_cursor: str | None


class UserPatch(StrictModel):
    display_name: Annotated[str | None, Field(max_length=64)] = None
    email: EmailStr | None = None


class AdminUserPatch(StrictModel):
    role: Literal["user", "admin"] | None = None
    is_active: bool | None = None


class AdminStats(BaseModel):
    users: int
    active_users: int
    conversations: int
    messages: int
    connections: dict[str, int]
