"""Time to first token when requests arrive in bursts: N concurrent streamed completions (benchmark 1's
request), repeated, against one running server; prints TTFT percentiles, the burst's wall time and, with
--pid, the CPU time the server's main thread spent per burst (from /proc: the event loop for the gateway).

    python scripts/bench_bursts.py http://127.0.0.1:8000 --streams 16 --bursts 6 --pid 1234

It measures one server at a time; run it against each peer in turn (docs/benchmarks-history.md, benchmark 1, GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from bench_streams import ALIAS, PROMPT

MAX_TOKENS = 128


def main_thread_cpu_ms(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/task/{pid}/schedstat") as stats:
        return int(stats.read().split()[0]) / 1e6


async def first_token_ms(session: aiohttp.ClientSession, url: str) -> float:
    body = {"model": ALIAS, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    sent, first = time.perf_counter(), None
    async with session.post(url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"text":""' not in line:
                first = time.perf_counter()
    return (first - sent) * 1000


async def run(url: str, streams: int, bursts: int, pid: int | None) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*[first_token_ms(session, url) for _ in range(streams)])  # warm-up
        ttfts, walls, cpus = [], [], []
        for _ in range(bursts):
            cpu, started = main_thread_cpu_ms(pid), time.perf_counter()
            ttfts += await asyncio.gather(*[first_token_ms(session, url) for _ in range(streams)])
            walls.append(time.perf_counter() - started)
            cpus.append(main_thread_cpu_ms(pid) - cpu)
    ttfts.sort()
    wall = statistics.median(walls)
    line = (
        f"n={streams} TTFT p50={statistics.median(ttfts):.1f} p90={ttfts[int(0.9 * len(ttfts))]:.1f} "
        f"min={ttfts[0]:.1f} max={ttfts[-1]:.1f} ms | burst wall p50={wall * 1000:.0f} ms "
        f"({streams * MAX_TOKENS / wall:.0f} tok/s)"
    )
    return line + (f" | main-thread CPU per burst p50={statistics.median(cpus):.1f} ms" if pid else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server's base URL, without /v1")
    parser.add_argument("--streams", type=int, default=16, help="requests per burst")
    parser.add_argument("--bursts", type=int, default=6)
    parser.add_argument("--pid", type=int, help="the server's process id, for its main thread's CPU time")
    args = parser.parse_args()
    print(asyncio.run(run(args.url, args.streams, args.bursts, args.pid)))


if __name__ == "__main__":
    main()
