"""What a rate-limited request waits for in the gateway's shared state (gateway/state/), in this process: the key's
admission (its count and its tokens' hold, before the first byte), the target's cooldown check, and its settle (after
the last byte, in the background), each request after the last, with LocalState and with RedisState on a
redis-server started here (Debian's). Prints the p50/p99 wait per request and Redis calls per request.

    python scripts/bench_state_calls.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import redis_server  # noqa: E402

from gateway.routing.breaker import Breaker  # noqa: E402
from gateway.state.local import LocalState  # noqa: E402
from gateway.state.redis_state import RedisState  # noqa: E402
from gateway.state.shared import SharedState  # noqa: E402

OWNER = "0" * 32
MOST_TOKENS, USED = 1000, 12  # a request's maximum, and what it used


async def waits(state: SharedState, requests: int) -> list[float]:
    """Seconds each request waited for the state, before its first byte (nothing after its last)."""
    window = state.window(OWNER, 10**9, 10**12)  # limits that never refuse: every request is counted
    breaker = Breaker(state.circuit("target", 3, 30))
    waited = []
    for _ in range(requests):
        started = time.perf_counter()
        hold = await window.admit(MOST_TOKENS)
        await breaker.check()
        waited.append(time.perf_counter() - started)
        window.settle(hold, USED)
        await asyncio.sleep(0)  # the relay: the settle starts meanwhile
    await state.settled()
    return waited


def script_calls(url: str) -> int:
    return redis.Redis.from_url(url).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def report(name: str, waited: list[float]) -> None:
    ordered = sorted(waited)
    p50, p99 = statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6
    print(f"{name}: waits p50 {p50:.0f} µs, p99 {p99:.0f} µs per request")


async def main(requests: int) -> None:
    report("local", await waits(LocalState(), requests))
    with tempfile.TemporaryDirectory() as folder:
        process, url = redis_server(Path(folder))
        try:
            state = RedisState(url, timeout=5, fail_open=False, lease_s=700)
            await state.start()
            before = script_calls(url)
            try:
                report("redis", await waits(state, requests))
            finally:
                await state.close()
            print(f"redis: {(script_calls(url) - before) / requests:.2f} script calls per request (all of them)")
        finally:
            process.kill()
            process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(main(parser.parse_args().requests))
