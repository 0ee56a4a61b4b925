"""What the WebSocket and SSE handshakes share: the Origin allowlist and the query-string
credentials (`?ticket=`, `?token=`) that browsers use because they cannot set headers.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection

from parley.auth.service import Principal, access_principal_by_ticket, access_principal_by_token
from parley.config import Settings
from parley.db.session import Database


def allowed_origins(headers: Headers, settings: Settings) -> set[str]:
    origins = set(settings.ws_allowed_origins or settings.cors_origins)
    host = headers.get("host")
    if host and settings.ws_allowed_origins is None:
        # The server's own origin (its web page), under either scheme.
        origins |= {f"http://{host}", f"https://{host}"}
    return origins


def origin_allowed(conn: HTTPConnection, settings: Settings) -> bool:
    """A browser always sends Origin; a request without one is not from a browser page,
    so no other site can be riding on the user's credentials (§8)."""
    # Parsed here rather than through conn.headers, which a socket would keep.
    headers = Headers(scope=conn.scope)
    origin = headers.get("origin")
    return origin is None or origin in allowed_origins(headers, settings)


async def access_principal_by_query(
    db: Database, settings: Settings, *, ticket: str | None, token: str | None
) -> Principal | None:
    """The caller named by `?ticket=` (spent here: single use) or `?token=`; None when
    neither is given. Raises Unauthorized for one that is given and not valid."""
    if ticket:
        # Spending a ticket is a write.
        async with db.transaction() as session:
            return await access_principal_by_ticket(session, ticket)
    if token:
        async with db.transaction(write=False) as session:
            return await access_principal_by_token(session, settings, token)
    return None
