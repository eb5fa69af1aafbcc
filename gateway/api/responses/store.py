"""The stored responses, bounded by count and by age (the oldest go first), each readable only by the API key that
made it (its `owner`): in an SQLite file in LLM_DATA_DIR that outlives restarts (`SqliteResponses`), or in Redis,
shared by the replicas (LLM_REDIS_URL; gateway/state/), as the app factory wires it.

Every SQLite call runs on a worker thread (`asyncio.to_thread`) with a connection of its own: SQLite's write-ahead log
lets readers go on while one writes, and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic_core import from_json

from gateway.state.shared import Responses

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order they were stored in: the oldest go first
    id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,  -- the response object, JSON
    input TEXT NOT NULL,  -- the items it was made from, earlier turns' included, JSON
    UNIQUE (owner, id)  -- a provider's ids are its own: one it sends again replaces the earlier response
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


@dataclass(frozen=True)
class StoredResponse:
    response: str
    input: str

    def conversation(self) -> list[dict[str, Any]]:
        """Its input and output items: what a request that continues from it comes after."""
        return from_json(self.input) + from_json(self.response)["output"]


class ResponseStore:
    """What the Responses front end keeps and reads, wherever `responses` keeps it."""

    def __init__(self, responses: Responses):
        self.responses = responses

    async def put(self, owner: str, response_id: str, response: str, input: str) -> None:
        await self.responses.put(owner, response_id, response, input)

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The response if `owner` stored it and it has not expired; None otherwise, whoever else stored it."""
        found = await self.responses.get(owner, response_id)
        return None if found is None else StoredResponse(*found)

    async def conversation(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """The items a request that continues from the response comes after, as `get` finds it."""
        stored = await self.get(owner, response_id)
        return None if stored is None else stored.conversation()

    async def delete(self, owner: str, response_id: str) -> bool:
        return await self.responses.delete(owner, response_id)


class SqliteResponses:
    """This process's own store (a `Responses`): one SQLite file."""

    def __init__(self, path: Path, max_count: int, max_age_s: float):
        self.path, self.max_count, self.max_age_s = path, max_count, max_age_s
        self._ready = False  # the file and its table exist

    async def put(self, owner: str, response_id: str, response: str, input: str) -> None:
        await asyncio.to_thread(self._put, owner, response_id, response, input)

    async def get(self, owner: str, response_id: str) -> tuple[str, str] | None:
        return await asyncio.to_thread(self._get, owner, response_id)

    async def delete(self, owner: str, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, owner, response_id)

    def _put(self, owner: str, response_id: str, response: str, input: str) -> None:
        now = time.time()
        with self._db() as db:
            seq = db.execute(
                "INSERT OR REPLACE INTO responses (id, owner, created_at, response, input) VALUES (?, ?, ?, ?, ?)",
                (response_id, owner, now, response, input),
            ).lastrowid
            db.execute("DELETE FROM responses WHERE seq <= ? OR created_at < ?", (seq - self.max_count,
                                                                                  now - self.max_age_s))  # fmt: skip

    def _get(self, owner: str, response_id: str) -> tuple[str, str] | None:
        with self._db() as db:
            row = db.execute(
                "SELECT response, input FROM responses WHERE id = ? AND owner = ? AND created_at >= ?",
                (response_id, owner, time.time() - self.max_age_s),
            ).fetchone()
        return row

    def _delete(self, owner: str, response_id: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection for one call, inside one transaction (committed unless the call failed)."""
        if not self._ready:  # two threads may both get here: each step below can run twice
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db:
            if not self._ready:
                db.execute("PRAGMA journal_mode=WAL")  # kept in the file
                db.executescript(SCHEMA)
                self._ready = True
            db.execute("PRAGMA synchronous=NORMAL")  # with the log: safe from a crash of the process, not of the host
            with db:
                yield db


@functools.cache
def sqlite_at(path: Path, max_count: int, max_age_s: float) -> SqliteResponses:
    """The one store of a file (for every app of this process that names it)."""
    return SqliteResponses(path, max_count, max_age_s)
