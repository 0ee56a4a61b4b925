"""§9.2 and §9.4 under real concurrency: many requests in flight on one database.

On PostgreSQL these race for real (row locks, unique indexes); on SQLite the writers are
serialized by BEGIN IMMEDIATE, which must not turn into errors either."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import User, send

TASKS = 8
SENDS_PER_TASK = 50


async def test_concurrent_senders_get_one_gap_free_sequence(
    alice: User, bob: User, room: dict[str, Any]
) -> None:
    before = (await alice.get(f"/conversations/{room['id']}")).json()["last_seq"]

    async def sender(user: User, task: int) -> list[int]:
        seqs = []
        for i in range(SENDS_PER_TASK):
            seqs.append((await send(user, room["id"], f"t{task} m{i}"))["seq"])
        return seqs

    results = await asyncio.gather(*(sender(alice if t % 2 else bob, t) for t in range(TASKS)))
    seqs = sorted(s for r in results for s in r)
    total = TASKS * SENDS_PER_TASK
    assert seqs == list(range(before + 1, before + total + 1))
    # Each sender saw its own messages in increasing order.
    assert all(r == sorted(r) for r in results)
    after = (await alice.get(f"/conversations/{room['id']}")).json()
    assert after["last_seq"] == before + total

    # History pages agree: every seq once, ascending.
    seen: list[int] = []
    cursor = 0
    while True:
        params: dict[str, Any] = {"limit": 100, "after": cursor}
        page = (await bob.get(f"/conversations/{room['id']}/messages", params=params)).json()
        seen += [m["seq"] for m in page["messages"]]
        if not page["has_more"]:
            break
        cursor = seen[-1]
    assert seen == seqs


async def test_concurrent_retries_with_one_client_msg_id_make_one_message(
    alice: User, room: dict[str, Any]
) -> None:
    before = (await alice.get(f"/conversations/{room['id']}")).json()["last_seq"]
    responses = await asyncio.gather(
        *(
            alice.post(
                f"/conversations/{room['id']}/messages",
                json={"content": "only once", "client_msg_id": "retry-1"},
            )
            for _ in range(10)
        )
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 9 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    history = (await alice.get(f"/conversations/{room['id']}/messages")).json()["messages"]
    assert [m["content"] for m in history] == ["only once"]
    after = (await alice.get(f"/conversations/{room['id']}")).json()["last_seq"]
    assert after == before + 1  # the losers gave their seq back: no gap


async def test_concurrent_direct_get_or_create_makes_one_conversation(
    alice: User, bob: User
) -> None:
    responses = await asyncio.gather(
        *(
            (alice if i % 2 else bob).post(
                "/conversations/direct", json={"user_id": bob.id if i % 2 else alice.id}
            )
            for i in range(10)
        )
    )
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    listed = (await alice.get("/conversations")).json()["conversations"]
    assert [c["kind"] for c in listed] == ["direct"]
    assert listed[0]["member_count"] == 2
