"""Load generators that stay cheap on 2 cores.

HTTP: a minimal HTTP/1.1 keep-alive client over raw asyncio streams (uvloop), run in
several processes. A general-purpose client (httpx) would spend more CPU than the
server under test and measure itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class HttpTarget:
    port: int
    path: str
    token: str | None
    # One JSON body per connection: (conversation id, content) for example.
    bodies: list[dict[str, Any]]


@dataclass
class HttpResult:
    ok: int
    errors: int
    seconds: float
    latencies: list[float]


def _request(target: HttpTarget, body: bytes) -> bytes:
    headers = [
        f"POST {target.path} HTTP/1.1",
        f"Host: 127.0.0.1:{target.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if target.token:
        headers.append(f"Authorization: Bearer {target.token}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _connection(
    target: HttpTarget, body: dict[str, Any], path: str, until: float, warm_until: float
) -> tuple[int, int, list[float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    ok = errors = 0
    latencies: list[float] = []
    n = 0
    try:
        while True:
            now = time.perf_counter()
            if now >= until:
                break
            payload = dict(body)
            payload["content"] = f"{body.get('content', 'm')} {n}"
            n += 1
            request = _request(
                HttpTarget(target.port, path, target.token, []), orjson.dumps(payload)
            )
            writer.write(request)
            status = await _read_response(reader)
            done = time.perf_counter()
            if now >= warm_until:
                if status in (200, 201):
                    ok += 1
                    latencies.append(done - now)
                else:
                    errors += 1
    finally:
        writer.close()
    return ok, errors, latencies


async def _worker(targets: list[HttpTarget], seconds: float, warmup: float) -> HttpResult:
    start = time.perf_counter()
    warm_until = start + warmup
    until = warm_until + seconds
    runs = []
    for target in targets:
        for body in target.bodies:
            runs.append(_connection(target, body, target.path, until, warm_until))
    results = await asyncio.gather(*runs)
    return HttpResult(
        ok=sum(r[0] for r in results),
        errors=sum(r[1] for r in results),
        seconds=seconds,
        latencies=[x for r in results for x in r[2]],
    )


def _run_worker(targets: list[HttpTarget], seconds: float, warmup: float) -> HttpResult:
    import uvloop

    return uvloop.run(_worker(targets, seconds, warmup))


async def http_closed_loop(
    targets: list[HttpTarget], *, seconds: float, warmup: float, processes: int = 2
) -> HttpResult:
    """Each (target, body) pair is one keep-alive connection sending back to back.

    The connections are spread over `processes` worker processes; throughput counts
    only responses completed after the warm-up."""
    pairs = [(t, b) for t in targets for b in t.bodies]
    shards: list[list[HttpTarget]] = [[] for _ in range(processes)]
    for i, (target, body) in enumerate(pairs):
        shards[i % processes].append(HttpTarget(target.port, target.path, target.token, [body]))
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            loop.run_in_executor(pool, _run_worker, shard, seconds, warmup)
            for shard in shards
            if shard
        ]
        results = await asyncio.gather(*futures)
    return HttpResult(
        ok=sum(r.ok for r in results),
        errors=sum(r.errors for r in results),
        seconds=seconds,
        latencies=[x for r in results for x in r.latencies],
    )
