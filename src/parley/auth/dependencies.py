from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from parley.auth.security import AccessClaims, decode_access_token
from parley.auth.service import Principal, access_principal_by_token
from parley.db.session import SessionDep
from parley.deps import SettingsDep
from parley.errors import Forbidden, Unauthorized
from parley.ops.context import user_id_var
from parley.ops.ratelimit import RateLimiter

# tokenUrl points at the login endpoint, which also takes the OAuth2 password form, so
# the Authorize button of /docs works.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/login", auto_error=False)


async def get_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> Principal:
    if not token:
        raise Unauthorized()
    principal = await access_principal_by_token(session, settings, token)
    user_id_var.set(str(principal.id))
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check(limiter.requests, "requests", principal.id.hex)
    return principal


async def get_claims(
    request: Request,
    settings: SettingsDep,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> AccessClaims:
    """A verified access token whose session is not checked here: for an endpoint that
    checks it in its own statement (the send, parley.messages.service.do_send). Its
    per-request limit is taken before the session is known to be live."""
    if not token:
        raise Unauthorized()
    claims = decode_access_token(settings.signing_key, token)
    user_id_var.set(str(claims.user_id))
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check(limiter.requests, "requests", claims.user_id.hex)
    return claims


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This needs a global admin")
    return principal


CurrentUser = Annotated[Principal, Depends(get_principal)]
TokenClaims = Annotated[AccessClaims, Depends(get_claims)]
AdminUser = Annotated[Principal, Depends(get_admin)]
