"""REST parts of real time: typing, presence, and the protocol's JSON Schema."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import select

from parley.auth.dependencies import CurrentUser
from parley.config import API_PREFIX
from parley.db.session import SessionDep
from parley.errors import invalid_field
from parley.models import Conversation, Membership
from parley.realtime.events import event_schemas
from parley.realtime.service import Realtime
from parley.schemas import StrictModel

router = APIRouter(prefix=API_PREFIX, tags=["realtime"])

MAX_PRESENCE_IDS = 100


class TypingIn(StrictModel):
    is_typing: bool


class TypingList(BaseModel):
    typing: list[uuid.UUID]


class PresenceOut(BaseModel):
    presence: dict[uuid.UUID, str]


def _realtime(request: Request) -> Realtime:
    realtime: Realtime = request.app.state.realtime
    return realtime


@router.post("/conversations/{conversation_id}/typing", status_code=204, operation_id="set_typing")
async def set_typing(
    conversation_id: uuid.UUID,
    body: TypingIn,
    principal: CurrentUser,
    session: SessionDep,
    request: Request,
) -> Response:
    await _realtime(request).set_typing(session, principal, conversation_id, body.is_typing)
    return Response(status_code=204)


@router.get("/conversations/{conversation_id}/typing", operation_id="list_typing")
async def list_typing(
    conversation_id: uuid.UUID, principal: CurrentUser, session: SessionDep, request: Request
) -> TypingList:
    users = await _realtime(request).who_is_typing(session, principal, conversation_id)
    return TypingList(typing=users)


@router.get("/presence", operation_id="get_presence")
async def get_presence(
    principal: CurrentUser,
    session: SessionDep,
    request: Request,
    user_ids: Annotated[str, Query(max_length=MAX_PRESENCE_IDS * 37)],
) -> PresenceOut:
    """Presence of users who share a conversation with the caller (others are left out)."""
    try:
        wanted = list(dict.fromkeys(uuid.UUID(p.strip()) for p in user_ids.split(",") if p.strip()))
    except ValueError as exc:
        raise invalid_field(
            "user_ids", "comma-separated user ids", detail="user_ids must be UUIDs", source="query"
        ) from exc
    if not wanted or len(wanted) > MAX_PRESENCE_IDS:
        raise invalid_field(
            "user_ids",
            f"1 to {MAX_PRESENCE_IDS} ids",
            detail=f"Ask for 1 to {MAX_PRESENCE_IDS} users",
            source="query",
        )
    # A deleted conversation keeps its member rows (history stays), but it no longer
    # makes anyone's presence the caller's business.
    mine = (
        select(Membership.conversation_id)
        .join(Conversation, Conversation.id == Membership.conversation_id)
        .where(Membership.user_id == principal.id, Conversation.deleted_at.is_(None))
    )
    shared = set(
        (
            await session.scalars(
                select(Membership.user_id).where(
                    Membership.user_id.in_(wanted), Membership.conversation_id.in_(mine)
                )
            )
        ).all()
    )
    visible = [u for u in wanted if u in shared or u == principal.id]
    online = await _realtime(request).presence.online(visible)
    return PresenceOut(presence={u: "online" if online[u] else "offline" for u in visible})


@router.get("/realtime/schema", operation_id="realtime_schema")
async def realtime_schema() -> dict[str, Any]:
    """JSON Schema of every WebSocket/SSE op and event, generated from the models the
    server itself uses."""
    return event_schemas()
