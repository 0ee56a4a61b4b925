"""Liveness and readiness (§10)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["ops"])


@router.get("/health", operation_id="health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    operation_id="ready",
    responses={503: {"description": "A dependency does not answer, or shutting down"}},
)
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    checks: dict[str, Any] = {}
    if getattr(state, "shutting_down", False):
        return JSONResponse({"status": "shutting_down", "checks": checks}, status_code=503)
    try:
        async with state.db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    if state.settings.redis_url:
        checks["redis"] = "ok" if await state.realtime.broker.ping() else "error: unreachable"
    failing = [name for name, value in checks.items() if value != "ok"]
    if failing:
        return JSONResponse(
            {"status": "unavailable", "failing": failing, "checks": checks}, status_code=503
        )
    return JSONResponse({"status": "ok", "checks": checks})
