"""All tables; importing this package registers them on `Base.metadata`."""

from parley.models.auth import AuthSession, RefreshToken, Ticket
from parley.models.conversation import (
    Conversation,
    ConversationBan,
    ConversationEvent,
    Membership,
    ReadMark,
)
from parley.models.message import Mention, Message, MessageVersion
from parley.models.stream import StreamCheckpoint
from parley.models.user import User

__all__ = [
    "AuthSession",
    "Conversation",
    "ConversationBan",
    "ConversationEvent",
    "Membership",
    "Mention",
    "Message",
    "MessageVersion",
    "ReadMark",
    "RefreshToken",
    "StreamCheckpoint",
    "Ticket",
    "User",
]
