"""Thin transport for §3: parse, rate-limit, call the service."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from parley.auth import service
from parley.auth.dependencies import CurrentUser
from parley.auth.schemas import (
    LoginIn,
    PasswordChangeIn,
    RefreshIn,
    RegisterIn,
    TicketOut,
    TokenOut,
)
from parley.config import API_PREFIX
from parley.db.session import SessionDep
from parley.deps import HasherDep, SettingsDep
from parley.errors import MalformedJSON, Unprocessable, error_responses, invalid_field
from parley.ops.ratelimit import RateLimiter
from parley.users.schemas import MeOut

router = APIRouter(prefix=f"{API_PREFIX}/auth", tags=["auth"])


async def get_rate_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post(
    "/register",
    status_code=201,
    operation_id="register",
    responses=error_responses(409, 422, 429),
)
async def register(
    body: RegisterIn,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    hasher: HasherDep,
    limiter: RateLimiterDep,
) -> TokenOut:
    await limiter.check(limiter.register, "register-ip", _client_ip(request))
    return await service.do_register(session, settings, hasher, body)


_LOGIN_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/LoginIn"}},
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["username", "password"],
                    "properties": {
                        "grant_type": {"type": "string", "enum": ["password"]},
                        "username": {"type": "string"},
                        "password": {"type": "string", "format": "password"},
                    },
                }
            },
        },
    }
}


async def _read_login(request: Request) -> LoginIn:
    """JSON body, or the OAuth2 password form that the /docs Authorize button sends."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.form()
            # OAuth2 (RFC 6749 §4.3.2) names the grant; FastAPI's own password form takes
            # it as optional but, when given, it must be "password". Other OAuth2 fields
            # (scope, client_id) carry nothing for Parley and are ignored.
            grant_type = form.get("grant_type")
            if grant_type is not None and grant_type != "password":
                raise invalid_field(
                    "grant_type",
                    "Input should be 'password'",
                    detail="Only the OAuth2 password grant is supported",
                    type_="literal_error",
                )
            fields = {k: v for k, v in form.items() if k in ("username", "password")}
            return LoginIn.model_validate(fields)
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise MalformedJSON() from exc
        return LoginIn.model_validate(payload)
    except ValidationError as exc:
        errors = [
            {"loc": ["body", *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        raise Unprocessable("The request did not validate", errors=errors) from exc


@router.post(
    "/login",
    operation_id="login",
    openapi_extra=_LOGIN_BODY,
    responses=error_responses(400, 401, 422, 429),
)
async def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    hasher: HasherDep,
    limiter: RateLimiterDep,
) -> TokenOut:
    body = await _read_login(request)
    await limiter.check(limiter.login, "login-ip", _client_ip(request))
    await limiter.check(limiter.login, "login-user", body.username)
    return await service.do_login(session, settings, hasher, body.username, body.password)


@router.post("/refresh", operation_id="refresh_token", responses=error_responses(401, 422))
async def refresh(body: RefreshIn, session: SessionDep, settings: SettingsDep) -> TokenOut:
    return await service.do_refresh(session, settings, body.refresh_token)


@router.post("/logout", status_code=204, operation_id="logout", responses=error_responses(401, 422))
async def logout(body: RefreshIn, session: SessionDep) -> Response:
    await service.do_logout(session, body.refresh_token)
    return Response(status_code=204)


@router.post("/ticket", operation_id="issue_ticket", responses=error_responses(401))
async def issue_ticket(principal: CurrentUser, session: SessionDep) -> TicketOut:
    return await service.do_issue_ticket(session, principal)


@router.get("/me", operation_id="get_me", responses=error_responses(401))
async def me(principal: CurrentUser) -> MeOut:
    return MeOut.model_validate(principal.user)


@router.post(
    "/password",
    status_code=204,
    operation_id="change_password",
    responses=error_responses(401, 422),
)
async def change_password(
    body: PasswordChangeIn, principal: CurrentUser, session: SessionDep, hasher: HasherDep
) -> Response:
    await service.do_change_password(
        session, hasher, principal, body.current_password, body.new_password
    )
    return Response(status_code=204)
