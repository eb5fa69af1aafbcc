"""A real Redis for the shared-state tests: Debian's `redis-server` (`make test` installs it) on a free loopback
port, keeping nothing on disk. Without it the tests skip, and fail under CI=true."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import redis

from tests.conftest import free_port, skip_unless_ci, wait_for


class RedisServer:
    def __init__(self, folder: Path):
        self.port, self.folder = free_port(), folder
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def start(self) -> RedisServer:
        """Starts it (again, after `stop`, on the same port) and waits until it answers."""
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.folder)]  # fmt: skip
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        wait_for(self._answers, 10, f"redis-server on port {self.port} (see {self.folder / 'redis.log'})")
        return self

    def _answers(self) -> bool:
        try:
            return self.client().ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """Kills it at once, as an outage would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def running_redis(folder: Path) -> Iterator[RedisServer]:
    """A started server, killed afterwards (each test module's fixture, of the scope it needs)."""
    if shutil.which("redis-server") is None:
        skip_unless_ci("redis-server is missing: `make test` installs it (apt-get install redis-server)")
    server = RedisServer(folder).start()
    try:
        yield server
    finally:
        server.stop()
