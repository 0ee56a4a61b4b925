from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from parley.schemas import StrictModel
from parley.users.schemas import UserRef

# A hard ceiling for the schema; the configured PARLEY_MAX_MESSAGE_CHARS (default 4000)
# is checked by the service, since it can be set per deployment.
CONTENT_CEILING = 100_000
MAX_ATTACHMENTS = 10


# Characters no database here can store as text: PostgreSQL refuses NUL, and a lone UTF-16
# surrogate (which JSON's "\ud800" escape can carry) has no UTF-8 encoding at all. Left to
# the driver they would be a 500; they are a 422 like any other bad input (§9.7).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def check_storable(value: str) -> str:
    if _UNSTORABLE.search(value):
        raise ValueError("must not contain NUL or unpaired surrogate characters")
    return value


def _not_only_whitespace(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only white space")
    return value


Content = Annotated[
    str,
    Field(min_length=1, max_length=CONTENT_CEILING),
    AfterValidator(check_storable),
    AfterValidator(_not_only_whitespace),
]
ClientMsgId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


class MessageCreate(StrictModel):
    content: Content
    client_msg_id: ClientMsgId | None = None
    reply_to_id: uuid.UUID | None = None
    attachment_ids: Annotated[list[uuid.UUID], Field(max_length=MAX_ATTACHMENTS)] = []


class MessageEdit(StrictModel):
    content: Content


class ReadIn(StrictModel):
    seq: Annotated[int, Field(ge=0, le=2**53)]


class Reaction(BaseModel):
    emoji: str
    count: int
    me: bool


# For the sender, in direct and group conversations; null elsewhere.
Status = Literal["sent", "delivered", "read"]


class MessageOut(BaseModel):
    id: uuid.UUID
    conversation_id: uuid.UUID
    seq: int
    updated_seq: int
    sender: UserRef
    content: str
    client_msg_id: str | None
    reply_to_id: uuid.UUID | None
    attachments: list[dict[str, object]]
    reactions: list[Reaction]
    mentions: list[uuid.UUID]
    pinned: bool
    created_at: datetime
    edited_at: datetime | None
    deleted: bool
    status: Status | None


class MessagePage(BaseModel):
    messages: list[MessageOut]
    has_more: bool


class MessageList(BaseModel):
    messages: list[MessageOut]
    next_cursor: str | None


class VersionOut(BaseModel):
    content: str
    created_at: datetime
    replaced_at: datetime


class VersionList(BaseModel):
    versions: list[VersionOut]
    next_cursor: str | None


class ReceiptOut(BaseModel):
    user_id: uuid.UUID
    delivered: bool
    read: bool
    read_at: datetime | None


class ReceiptList(BaseModel):
    receipts: list[ReceiptOut]
    next_cursor: str | None
