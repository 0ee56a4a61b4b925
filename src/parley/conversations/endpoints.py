"""Thin transport for §5."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from parley.auth.dependencies import CurrentUser
from parley.config import API_PREFIX
from parley.conversations import service
from parley.conversations.schemas import (
    ConversationCreate,
    ConversationList,
    ConversationOut,
    ConversationPatch,
    DirectCreate,
    MemberList,
    MemberPut,
    MembershipOut,
)
from parley.db.session import SessionDep
from parley.deps import SettingsDep
from parley.errors import error_responses
from parley.pagination import DEFAULT_PAGE, Cursor, Limit

router = APIRouter(prefix=f"{API_PREFIX}/conversations", tags=["conversations"])


def _no_content() -> Response:
    return Response(status_code=204)


@router.post(
    "", status_code=201, operation_id="create_conversation", responses=error_responses(409)
)
async def create_conversation(
    body: ConversationCreate, principal: CurrentUser, session: SessionDep, settings: SettingsDep
) -> ConversationOut:
    conversation = await service.do_create_conversation(session, settings, principal, body)
    return await service.view_one(session, principal, conversation)


@router.post(
    "/direct",
    status_code=201,
    operation_id="get_or_create_direct",
    responses={200: {"description": "The existing direct conversation", "model": ConversationOut}},
)
async def get_or_create_direct(
    body: DirectCreate,
    principal: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
) -> ConversationOut:
    conversation, created = await service.do_get_or_create_direct(
        session, settings, principal, body.user_id
    )
    if not created:
        response.status_code = 200
    return await service.view_one(session, principal, conversation)


@router.get("", operation_id="list_conversations")
async def list_conversations(
    principal: CurrentUser,
    session: SessionDep,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> ConversationList:
    return await service.list_conversations(session, principal, cursor=cursor, limit=limit)


@router.get("/public", operation_id="list_public_rooms")
async def list_public_rooms(
    principal: CurrentUser,
    session: SessionDep,
    # No NUL: PostgreSQL text cannot hold one, and no room name contains one.
    q: Annotated[str | None, Query(max_length=100, pattern=r"^[^\x00]*$")] = None,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> ConversationList:
    return await service.list_public(session, principal, q=q, cursor=cursor, limit=limit)


@router.get("/{conversation_id}", operation_id="get_conversation")
async def get_conversation(
    conversation_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> ConversationOut:
    access = await service.access_conversation(session, principal, conversation_id, public_ok=True)
    return await service.view_one(session, principal, access.conversation)


@router.patch(
    "/{conversation_id}", operation_id="update_conversation", responses=error_responses(403)
)
async def update_conversation(
    conversation_id: uuid.UUID, body: ConversationPatch, principal: CurrentUser, session: SessionDep
) -> ConversationOut:
    conversation = await service.do_update_conversation(session, principal, conversation_id, body)
    return await service.view_one(session, principal, conversation)


@router.delete(
    "/{conversation_id}",
    status_code=204,
    operation_id="delete_conversation",
    responses=error_responses(403),
)
async def delete_conversation(
    conversation_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> Response:
    await service.do_delete_conversation(session, principal, conversation_id)
    return _no_content()


@router.post(
    "/{conversation_id}/join", operation_id="join_conversation", responses=error_responses(403, 409)
)
async def join_conversation(
    conversation_id: uuid.UUID, principal: CurrentUser, session: SessionDep, settings: SettingsDep
) -> MembershipOut:
    membership = await service.do_join(session, settings, principal, conversation_id)
    return service.membership_out(membership)


@router.post(
    "/{conversation_id}/leave",
    status_code=204,
    operation_id="leave_conversation",
    responses=error_responses(403),
)
async def leave_conversation(
    conversation_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> Response:
    await service.do_leave(session, principal, conversation_id)
    return _no_content()


@router.get("/{conversation_id}/members", operation_id="list_members")
async def list_members(
    conversation_id: uuid.UUID,
    principal: CurrentUser,
    session: SessionDep,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> MemberList:
    return await service.list_members(
        session, principal, conversation_id, cursor=cursor, limit=limit
    )


@router.put(
    "/{conversation_id}/members/{user_id}",
    operation_id="put_member",
    responses=error_responses(403, 409),
)
async def put_member(
    conversation_id: uuid.UUID,
    user_id: uuid.UUID,
    principal: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    body: MemberPut | None = None,
) -> MembershipOut:
    membership, _added = await service.do_put_member(
        session, settings, principal, conversation_id, user_id, body.role if body else None
    )
    return service.membership_out(membership)


@router.delete(
    "/{conversation_id}/members/{user_id}",
    status_code=204,
    operation_id="remove_member",
    responses=error_responses(403, 409),
)
async def remove_member(
    conversation_id: uuid.UUID, user_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> Response:
    await service.do_kick(session, principal, conversation_id, user_id)
    return _no_content()


@router.post(
    "/{conversation_id}/bans/{user_id}",
    status_code=204,
    operation_id="ban_member",
    responses=error_responses(403, 409),
)
async def ban_member(
    conversation_id: uuid.UUID, user_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> Response:
    await service.do_ban(session, principal, conversation_id, user_id)
    return _no_content()


@router.delete(
    "/{conversation_id}/bans/{user_id}",
    status_code=204,
    operation_id="unban_member",
    responses=error_responses(403),
)
async def unban_member(
    conversation_id: uuid.UUID, user_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> Response:
    await service.do_unban(session, principal, conversation_id, user_id)
    return _no_content()
