from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from parley.schemas import StrictModel
from parley.users.schemas import UserRef

Kind = Literal["direct", "group", "room"]
Role = Literal["owner", "admin", "member"]


def _no_nul(value: str | None) -> str | None:
    # PostgreSQL text cannot store NUL: refuse it here (422) instead of failing in the
    # database (500), and on SQLite too, so both backends accept the same names.
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


def _strip_optional(value: str | None) -> str | None:
    if value is None:
        return None
    return value.strip() or None


Name = Annotated[
    str, Field(min_length=1, max_length=100), AfterValidator(_no_nul), AfterValidator(_not_blank)
]
Topic = Annotated[
    str | None, Field(max_length=500), AfterValidator(_no_nul), AfterValidator(_strip_optional)
]
# §2 bounds `member_ids`: more than 100 at creation is a bulk import, not a chat action.
MAX_INITIAL_MEMBERS = 100


class ConversationCreate(StrictModel):
    kind: Literal["group", "room"]
    name: Name
    topic: Topic = None
    member_ids: Annotated[list[uuid.UUID], Field(max_length=MAX_INITIAL_MEMBERS)] = []


class DirectCreate(StrictModel):
    user_id: uuid.UUID


class ConversationPatch(StrictModel):
    name: Name | None = None
    topic: Topic = None


class MemberPut(StrictModel):
    role: Role | None = None


class MessagePreview(BaseModel):
    id: uuid.UUID
    seq: int
    sender: UserRef
    content: str
    created_at: datetime


class ConversationOut(BaseModel):
    id: uuid.UUID
    kind: Kind
    name: str | None
    topic: str | None
    created_at: datetime
    updated_at: datetime
    member_count: int
    last_seq: int
    last_message: MessagePreview | None
    my_role: Role | None
    last_read_seq: int
    unread_count: int
    mention_count: int


class ConversationList(BaseModel):
    conversations: list[ConversationOut]
    next_cursor: str | None


class MembershipOut(BaseModel):
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    role: Role
    joined_at: datetime


class MemberOut(MembershipOut):
    username: str
    display_name: str | None


class MemberList(BaseModel):
    members: list[MemberOut]
    next_cursor: str | None
