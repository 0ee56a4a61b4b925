"""Thin transport for §6 (core)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import AfterValidator

from parley.auth.dependencies import CurrentUser, TokenClaims
from parley.config import API_PREFIX
from parley.db.session import SessionDep
from parley.deps import SettingsDep
from parley.errors import error_responses
from parley.messages import service
from parley.messages.schemas import (
    MessageCreate,
    MessageEdit,
    MessageList,
    MessageOut,
    MessagePage,
    ReadIn,
    ReceiptList,
    VersionList,
    check_storable,
)
from parley.ops.ratelimit import RateLimiter
from parley.pagination import DEFAULT_PAGE, Cursor, Limit

router = APIRouter(prefix=API_PREFIX, tags=["messages"])

Seq = Annotated[int | None, Query(ge=0, le=2**53)]


@router.post(
    "/conversations/{conversation_id}/messages",
    status_code=201,
    operation_id="send_message",
    response_model=MessageOut,
    responses={
        200: {
            "description": "A retry: the message first sent with this client_msg_id",
            "model": MessageOut,
        },
        **error_responses(413, 429),
    },
)
async def send_message(
    conversation_id: uuid.UUID,
    body: MessageCreate,
    claims: TokenClaims,
    settings: SettingsDep,
    request: Request,
) -> Response:
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check(limiter.send, "send", claims.user_id.hex)
    # No request-scoped session here: the common send is one statement that checks the
    # session itself, and only the others open a transaction.
    view, created = await service.do_send(
        request.app.state.db, settings, claims.user_id, claims.session_id, conversation_id, body
    )
    # The view is a MessageOut made by the service already: serialized here as FastAPI
    # would, without validating it against the response model a second time.
    return Response(
        view.model_dump_json(), status_code=201 if created else 200, media_type="application/json"
    )


@router.get("/conversations/{conversation_id}/messages", operation_id="list_messages")
async def list_messages(
    conversation_id: uuid.UUID,
    principal: CurrentUser,
    session: SessionDep,
    before: Seq = None,
    after: Seq = None,
    changed_after: Seq = None,
    limit: Limit = DEFAULT_PAGE,
) -> MessagePage:
    return await service.list_history(
        session,
        principal,
        conversation_id,
        before=before,
        after=after,
        changed_after=changed_after,
        limit=limit,
    )


@router.post("/conversations/{conversation_id}/read", status_code=204, operation_id="mark_read")
async def mark_read(
    conversation_id: uuid.UUID, body: ReadIn, principal: CurrentUser, session: SessionDep
) -> Response:
    await service.do_mark_read(session, principal, conversation_id, body.seq)
    return Response(status_code=204)


@router.get("/messages/search", operation_id="search_messages")
async def search_messages(
    principal: CurrentUser,
    session: SessionDep,
    q: Annotated[str, Query(min_length=1, max_length=100), AfterValidator(check_storable)],
    conversation_id: uuid.UUID | None = None,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> MessageList:
    return await service.search_messages(
        session, principal, q, conversation_id=conversation_id, cursor=cursor, limit=limit
    )


@router.get("/messages/{message_id}", operation_id="get_message")
async def get_message(
    message_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> MessageOut:
    return await service.get_message(session, principal, message_id)


@router.patch(
    "/messages/{message_id}", operation_id="edit_message", responses=error_responses(403, 409)
)
async def edit_message(
    message_id: uuid.UUID,
    body: MessageEdit,
    principal: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
) -> MessageOut:
    message = await service.do_edit_message(session, settings, principal, message_id, body.content)
    return (await service.build_views(session, principal, [message]))[0]


@router.delete(
    "/messages/{message_id}",
    status_code=204,
    operation_id="delete_message",
    responses=error_responses(403),
)
async def delete_message(
    message_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> Response:
    await service.do_delete_message(session, principal, message_id)
    return Response(status_code=204)


@router.get("/messages/{message_id}/history", operation_id="message_history")
async def message_history(
    message_id: uuid.UUID,
    principal: CurrentUser,
    session: SessionDep,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> VersionList:
    return await service.list_versions(session, principal, message_id, cursor=cursor, limit=limit)


@router.get("/messages/{message_id}/receipts", operation_id="message_receipts")
async def message_receipts(
    message_id: uuid.UUID,
    principal: CurrentUser,
    session: SessionDep,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> ReceiptList:
    return await service.list_receipts(session, principal, message_id, cursor=cursor, limit=limit)


@router.get("/users/{user_id}/messages", operation_id="list_user_messages")
async def list_user_messages(
    user_id: uuid.UUID,
    principal: CurrentUser,
    session: SessionDep,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> MessageList:
    return await service.list_user_messages(session, principal, user_id, cursor=cursor, limit=limit)
