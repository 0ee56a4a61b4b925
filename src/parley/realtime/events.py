"""The wire protocol: every server event and client op, as Pydantic models.

These models are the one source for the WebSocket, SSE and the published JSON Schema.
Events a conversation replays carry its `seq`; the others are ephemeral.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from parley.conversations.schemas import Role
from parley.messages.schemas import ClientMsgId, Content, MessageOut
from parley.schemas import StrictModel

MAX_RESUME_CURSORS = 1000  # §8: a resume op lists at most this many conversations
MAX_REF_CHARS = 64

Ref = Annotated[str | int | None, Field(default=None, description="Echoed in the reply")]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- sequenced events -------------------------------------------------------------------


class EventMessage(MessageOut):
    """A message as real-time events carry it: no per-viewer fields."""

    status: None = Field(default=None, exclude=True)


MessageEventType = Literal["message.created", "message.updated", "message.deleted"]


class MessageEvent(_Event):
    type: MessageEventType
    conversation_id: uuid.UUID
    seq: int
    message: EventMessage


MemberEventType = Literal["member.joined", "member.left", "member.updated"]


class MemberEvent(_Event):
    type: MemberEventType
    conversation_id: uuid.UUID
    seq: int
    user_id: uuid.UUID
    role: Role | None
    reason: Literal["left", "removed", "banned"] | None = None


# -- ephemeral events -------------------------------------------------------------------


class TypingEvent(_Event):
    type: Literal["typing"] = "typing"
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    is_typing: bool


class ReadEvent(_Event):
    type: Literal["read"] = "read"
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    seq: int = Field(description="The reader's marker; not a conversation seq of its own")


class PresenceEvent(_Event):
    type: Literal["presence"] = "presence"
    user_id: uuid.UUID
    status: Literal["online", "offline"]


class ConversationUpdatedEvent(_Event):
    type: Literal["conversation.updated"] = "conversation.updated"
    conversation_id: uuid.UUID
    name: str | None
    topic: str | None


class ConversationDeletedEvent(_Event):
    type: Literal["conversation.deleted"] = "conversation.deleted"
    conversation_id: uuid.UUID


class GapEvent(_Event):
    type: Literal["gap"] = "gap"
    conversation_id: uuid.UUID
    from_seq: int
    to_seq: int


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    ref: str | int | None = None
    code: str
    detail: str
    retry_after: float | None = None


# -- replies ----------------------------------------------------------------------------


class ReadyEvent(_Event):
    type: Literal["ready"] = "ready"
    user_id: uuid.UUID
    connection_id: str
    heartbeat: int


class AckEvent(_Event):
    type: Literal["ack"] = "ack"
    ref: str | int | None = None
    message: MessageOut


class HistoryEvent(_Event):
    type: Literal["history"] = "history"
    ref: str | int | None = None
    conversation_id: uuid.UUID
    messages: list[MessageOut]
    has_more: bool


class ResumedEvent(_Event):
    type: Literal["resumed"] = "resumed"
    ref: str | int | None = None
    cursors: dict[str, int]


class PongEvent(_Event):
    type: Literal["pong"] = "pong"
    ref: str | int | None = None


class BacklogEvent(_Event):
    type: Literal["backlog"] = "backlog"
    conversation_id: uuid.UUID
    messages: list[MessageOut]


ServerEvent = Annotated[
    MessageEvent
    | MemberEvent
    | TypingEvent
    | ReadEvent
    | PresenceEvent
    | ConversationUpdatedEvent
    | ConversationDeletedEvent
    | GapEvent
    | ErrorEvent
    | ReadyEvent
    | AckEvent
    | HistoryEvent
    | ResumedEvent
    | PongEvent
    | BacklogEvent,
    Field(discriminator="type"),
]


# -- client ops -------------------------------------------------------------------------


class _Op(StrictModel):
    ref: str | int | None = Field(default=None, description="Echoed in the reply")


class AuthOp(_Op):
    op: Literal["auth"]
    token: Annotated[str, Field(max_length=4096)]


class SendOp(_Op):
    op: Literal["send"]
    conversation_id: uuid.UUID | None = None
    content: Content
    client_msg_id: ClientMsgId | None = None
    reply_to_id: uuid.UUID | None = None
    attachment_ids: Annotated[list[uuid.UUID], Field(max_length=10)] = []


class EditOp(_Op):
    op: Literal["edit"]
    message_id: uuid.UUID
    content: Content


class DeleteOp(_Op):
    op: Literal["delete"]
    message_id: uuid.UUID


class TypingOp(_Op):
    op: Literal["typing"]
    conversation_id: uuid.UUID | None = None
    is_typing: bool


class ReadOp(_Op):
    op: Literal["read"]
    conversation_id: uuid.UUID | None = None
    seq: Annotated[int, Field(ge=0, le=2**53)]


class HistoryOp(_Op):
    op: Literal["history"]
    conversation_id: uuid.UUID | None = None
    before: Annotated[int | None, Field(ge=0, le=2**53)] = None
    after: Annotated[int | None, Field(ge=0, le=2**53)] = None
    limit: Annotated[int, Field(ge=1, le=100)] = 50


class ResumeOp(_Op):
    op: Literal["resume"]
    cursors: Annotated[
        dict[uuid.UUID, Annotated[int, Field(ge=0, le=2**53)]],
        Field(max_length=MAX_RESUME_CURSORS),
    ]


class PingOp(_Op):
    op: Literal["ping"]


ClientOp = Annotated[
    SendOp | EditOp | DeleteOp | TypingOp | ReadOp | HistoryOp | ResumeOp | PingOp | AuthOp,
    Field(discriminator="op"),
]
client_op_adapter: TypeAdapter[ClientOp] = TypeAdapter(ClientOp)


def event_schemas() -> dict[str, Any]:
    """JSON Schema of the protocol, served at /api/v1/realtime/schema."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Parley real-time protocol",
        "client_op": TypeAdapter(ClientOp).json_schema(),
        "server_event": TypeAdapter(ServerEvent).json_schema(),
    }
