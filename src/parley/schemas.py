"""Pieces every API schema shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Request bodies: unknown fields are an error, so a client can never set what it
    does not own (sender, seq, role …) by accident or on purpose."""

    model_config = ConfigDict(extra="forbid")
