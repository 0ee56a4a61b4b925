from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from parley.db.base import Base, IdMixin, utcnow


class StreamCheckpoint(IdMixin, Base):
    """Where each of a user's conversations stood when an SSE stream (re)based its ids.

    An event id on `/stream` names a checkpoint and the positions that moved since, so
    any process can recover the stream's position in every conversation (see
    `parley.realtime.sse`). Rows older than the refresh-token TTL are pruned."""

    __tablename__ = "stream_checkpoints"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # {conversation id (hex): the last seq the stream stood at}
    positions: Mapped[dict[str, int]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
