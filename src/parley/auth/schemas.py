from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, EmailStr, Field, StringConstraints

from parley.schemas import StrictModel
from parley.users.schemas import MeOut

USERNAME_PATTERN = r"^[a-z0-9_.-]{3,32}$"


def _strip_display_name(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _normalize_username(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


# Lowercased before the pattern is checked, so `ALICE` registers (and logs in) as `alice`.
Username = Annotated[
    str, BeforeValidator(_normalize_username), StringConstraints(pattern=USERNAME_PATTERN)
]
Password = Annotated[str, Field(min_length=8, max_length=256)]
DisplayName = Annotated[str | None, Field(max_length=64), AfterValidator(_strip_display_name)]


class RegisterIn(StrictModel):
    username: Username
    password: Password
    email: EmailStr | None = None
    display_name: DisplayName = None


class LoginIn(StrictModel):
    username: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, max_length=64)]
    password: Annotated[str, Field(max_length=256)]


class RefreshIn(StrictModel):
    refresh_token: Annotated[str, Field(min_length=1, max_length=256)]


class PasswordChangeIn(StrictModel):
    current_password: Annotated[str, Field(max_length=256)]
    new_password: Password


class TokenOut(BaseModel):
    user: MeOut
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (a scheme name, not a secret)
    expires_in: int


class TicketOut(BaseModel):
    ticket: str
    expires_in: int
