"""Thin transport for §4."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from parley.auth.dependencies import AdminUser, CurrentUser
from parley.config import API_PREFIX
from parley.db.session import SessionDep
from parley.errors import error_responses
from parley.pagination import DEFAULT_PAGE, Cursor, Limit
from parley.users import repository, service
from parley.users.schemas import (
    AdminStats,
    AdminUserList,
    AdminUserOut,
    AdminUserPatch,
    MeOut,
    UserList,
    UserOut,
    UserPatch,
)

router = APIRouter(prefix=f"{API_PREFIX}/users", tags=["users"])
admin_router = APIRouter(prefix=f"{API_PREFIX}/admin", tags=["admin"])

SearchQuery = Annotated[
    str | None, Query(max_length=64, description="Prefix of username or display name")
]


@router.get("", operation_id="list_users")
async def list_users(
    principal: CurrentUser,
    session: SessionDep,
    q: SearchQuery = None,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> UserList:
    users, next_cursor = await service.list_users(
        session, q=q, cursor=cursor, limit=limit, include_inactive=False
    )
    return UserList(
        users=[UserOut.of(u, me=u.id == principal.id) for u in users], next_cursor=next_cursor
    )


@router.patch("/me", operation_id="update_me", responses=error_responses(409))
async def update_me(body: UserPatch, principal: CurrentUser, session: SessionDep) -> MeOut:
    user = await service.do_update_me(session, principal, body)
    return MeOut.model_validate(user)


@router.delete("/me", status_code=204, operation_id="delete_me")
async def delete_me(principal: CurrentUser, session: SessionDep) -> Response:
    await service.do_deactivate(session, principal.user, reason="account_deleted")
    return Response(status_code=204)


@router.get("/{user_id}", operation_id="get_user")
async def get_user(
    user_id: uuid.UUID, principal: CurrentUser, session: SessionDep
) -> MeOut | UserOut:
    user = await service.access_user(session, user_id)
    return UserOut.of(user, me=user.id == principal.id)


@admin_router.get("/users", operation_id="admin_list_users", responses=error_responses(403))
async def admin_list_users(
    admin: AdminUser,
    session: SessionDep,
    q: SearchQuery = None,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> AdminUserList:
    users, next_cursor = await service.list_users(
        session, q=q, cursor=cursor, limit=limit, include_inactive=True
    )
    return AdminUserList(
        users=[AdminUserOut.model_validate(u) for u in users], next_cursor=next_cursor
    )


@admin_router.patch(
    "/users/{user_id}", operation_id="admin_update_user", responses=error_responses(403, 409)
)
async def admin_update_user(
    user_id: uuid.UUID, body: AdminUserPatch, admin: AdminUser, session: SessionDep
) -> AdminUserOut:
    user = await service.do_admin_update(session, admin, user_id, body)
    return AdminUserOut.model_validate(user)


@admin_router.get("/stats", operation_id="admin_stats", responses=error_responses(403))
async def admin_stats(admin: AdminUser, session: SessionDep, request: Request) -> AdminStats:
    users, active, conversations, messages = await repository.count_stats(session)
    return AdminStats(
        users=users,
        active_users=active,
        conversations=conversations,
        messages=messages,
        connections=await request.app.state.realtime.presence.processes(),
    )
