from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from parley.models import User
from parley.schemas import StrictModel

DELETED_USERNAME = "deleted-user"
DELETED_DISPLAY_NAME = "Deleted user"


class UserOut(BaseModel):
    """A user as anyone may see them (§4). No email: that is only on one's own user."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    username: str
    display_name: str | None
    role: Literal["user", "admin"]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, user: User, *, me: bool = False) -> MeOut | UserOut:
        """The user as the caller sees them: with the email when it is the caller's own."""
        return MeOut.model_validate(user) if me else UserOut.model_validate(user)


class MeOut(UserOut):
    """The caller's own user: the public fields plus the email.

    A class of its own rather than `email: null` on everyone else, so that other users'
    objects do not carry the key at all and the schema says which responses have it."""

    email: str | None


class AdminUserOut(MeOut):
    """What a global admin sees of any user: also the email and whether it is active."""

    is_active: bool


class UserRef(BaseModel):
    """How a message names its sender; a deactivated sender shows as a deleted user."""

    id: uuid.UUID
    username: str
    display_name: str | None


class UserList(BaseModel):
    # MeOut first: the caller's own entry carries its email, the others do not.
    users: list[MeOut | UserOut]
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
