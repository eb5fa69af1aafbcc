"""The Responses API's store: scoped by key, bounded by count and age, and a provider's repeated id replaces."""

from __future__ import annotations

import asyncio
import json

from gateway.api.responses.store import ResponseStore, SqliteResponses


def _response(text: str) -> str:
    return json.dumps({"output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]})


def test_each_key_reads_only_its_own_and_a_repeated_id_replaces(tmp_path):
    store = ResponseStore(SqliteResponses(tmp_path / "r.sqlite3", max_count=10, max_age_s=3600))

    async def scenario():
        await store.put("alice", "resp_1", _response("first"), "[]")
        await store.put("alice", "resp_1", _response("again"), "[]")  # a provider that sends its id twice
        await store.put("bob", "resp_1", _response("bob's"), "[]")
        return await store.get("alice", "resp_1"), await store.get("bob", "resp_1"), await store.get("eve", "resp_1")

    alice, bob, eve = asyncio.run(scenario())
    assert "again" in alice.response and "bob's" in bob.response and eve is None


def test_the_oldest_go_first_past_the_count_and_the_expired_are_gone(tmp_path):
    store = ResponseStore(SqliteResponses(tmp_path / "r.sqlite3", max_count=2, max_age_s=3600))

    async def scenario():
        for n in range(3):
            await store.put("k", f"resp_{n}", _response(str(n)), "[]")
        return [await store.get("k", f"resp_{n}") is not None for n in range(3)]

    assert asyncio.run(scenario()) == [False, True, True]
    expired = ResponseStore(SqliteResponses(tmp_path / "r.sqlite3", max_count=2, max_age_s=0))
    assert asyncio.run(expired.get("k", "resp_2")) is None
