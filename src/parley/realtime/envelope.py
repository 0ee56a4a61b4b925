"""What travels through the broker: an event serialized once, with a routing header.

The hub routes on the header (conversation, seq, type, subject) without parsing the
event itself; connections receive the payload bytes exactly as published.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from parley.realtime.events import GapEvent

_OUTBOX_KEY = "parley_outbox"


@dataclass(frozen=True, slots=True)
class Envelope:
    channel: str  # "c:<conversation id>" or "u:<user id>"
    type: str
    payload: bytes
    seq: int | None = None
    # The member a member.* event is about, the reader of a read event, the typist.
    subject: uuid.UUID | None = None
    # For "track" control messages on a user channel: the conversation to start routing.
    conversation_id: uuid.UUID | None = None
    # Wall-clock time of publishing, for the fan-out latency metric.
    published_at: float | None = None

    def encode(self) -> bytes:
        header: dict[str, Any] = {"t": self.type}
        if self.seq is not None:
            header["s"] = self.seq
        if self.subject is not None:
            header["u"] = self.subject.hex
        if self.conversation_id is not None:
            header["c"] = self.conversation_id.hex
        header["p"] = time.time()
        return orjson.dumps(header) + b"\n" + self.payload

    @classmethod
    def decode(cls, channel: str, data: bytes) -> Envelope:
        head, _, payload = data.partition(b"\n")
        header = orjson.loads(head)
        subject = header.get("u")
        conversation = header.get("c")
        return cls(
            channel=channel,
            type=header["t"],
            payload=payload,
            seq=header.get("s"),
            subject=uuid.UUID(subject) if subject else None,
            conversation_id=uuid.UUID(conversation) if conversation else None,
            published_at=header.get("p"),
        )


def conversation_channel(conversation_id: uuid.UUID) -> str:
    return f"c:{conversation_id.hex}"


def user_channel(user_id: uuid.UUID) -> str:
    return f"u:{user_id.hex}"


def serialize(event: BaseModel) -> bytes:
    return event.model_dump_json().encode()


def gap_payload(conversation_id: uuid.UUID, from_seq: int, to_seq: int) -> bytes:
    """The `gap` event that stands in for seqs a connection will not be sent."""
    return serialize(GapEvent(conversation_id=conversation_id, from_seq=from_seq, to_seq=to_seq))


def to_conversation(
    conversation_id: uuid.UUID,
    event: BaseModel,
    *,
    type_: str,
    seq: int | None = None,
    subject: uuid.UUID | None = None,
) -> Envelope:
    return Envelope(
        channel=conversation_channel(conversation_id),
        type=type_,
        payload=serialize(event),
        seq=seq,
        subject=subject,
    )


def to_user(user_id: uuid.UUID, event: BaseModel | None, *, type_: str, **fields: Any) -> Envelope:
    return Envelope(
        channel=user_channel(user_id),
        type=type_,
        payload=serialize(event) if event is not None else b"",
        **fields,
    )


def emit(session: AsyncSession, envelope: Envelope) -> None:
    """Queue an event to publish once this transaction commits (never before, never
    for a rollback)."""
    session.info.setdefault(_OUTBOX_KEY, []).append(envelope)


def take_outbox(session: AsyncSession) -> list[Envelope]:
    outbox: list[Envelope] = session.info.pop(_OUTBOX_KEY, [])
    return outbox


def drop_outbox(session: AsyncSession) -> None:
    session.info.pop(_OUTBOX_KEY, None)
