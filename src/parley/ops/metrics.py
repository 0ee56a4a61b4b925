"""Prometheus metrics (§10). Module-level: one set per process, whatever the app count."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from parley.errors import Forbidden, Unauthorized

REQUESTS = Counter(
    "parley_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"]
)
LATENCY = Histogram(
    "parley_http_request_duration_seconds",
    "HTTP request latency by route",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LIVE_CONNECTIONS = Gauge(
    "parley_live_connections", "Live WebSocket and SSE connections of this process", ["transport"]
)

EVENTS_FANNED_OUT = Counter(
    "parley_events_fanned_out_total", "Events handed to local connections", ["kind"]
)
FANOUT_LATENCY = Histogram(
    "parley_fanout_latency_seconds",
    "From publish (after commit) to routing in this process's hub",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUEUE_DROPS = Counter(
    "parley_queue_drops_total", "Connections closed with 4008 because their send queue was full"
)
HOLES_FILLED = Counter(
    "parley_holes_filled_total", "Sequenced events the hub loaded from the database"
)

router = APIRouter(tags=["ops"])


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get("/metrics", operation_id="metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    settings = request.app.state.settings
    if settings.metrics_token:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.metrics_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized("A metrics token is required")
    elif settings.env == "production" and not _is_loopback(
        request.client.host if request.client else None
    ):
        raise Forbidden("Metrics answer loopback only when no metrics token is set")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
