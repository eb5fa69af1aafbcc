"""Benchmark 4: the gateway's resident memory idle and after many requests (default model, one worker).

Each request is a one-token /v1/completions call, so the whole request path (routing, engine,
scheduler, response) runs every time while the model itself costs little. A leak of even a few
hundred bytes per request shows as megabytes after 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import Service, exit_on_sigterm, machine, markdown_table, write_result  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


async def hammer(url: str, total: int, concurrency: int) -> int:
    """Send `total` requests, `concurrency` at a time; returns how many failed."""
    body = {"model": "bench", "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    remaining = iter(range(total))
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for _ in remaining:
            async with session.post(url, json=body) as response:
                await response.read()
                failures += response.status != 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    exit_on_sigterm()
    env = {"LLM_SERVED_MODEL_NAME": "bench", "LLM_THREADS": str(args.threads), "LLM_LOG_LEVEL": "warning"}
    gateway = Service("gateway", [sys.executable, "-m", "gateway", "serve"], "/health", '"status":"ok"', env=env)
    gateway.env["LLM_PORT"] = str(gateway.port)
    try:
        gateway.start(Path(tempfile.mkdtemp(prefix="bench-memory-")))
        time.sleep(2)  # let start-up allocations settle
        idle = rss_mib(gateway.process.pid)
        started = time.perf_counter()
        failures = asyncio.run(hammer(gateway.base_url + "/v1/completions", args.requests, args.concurrency))
        seconds = time.perf_counter() - started
        after = rss_mib(gateway.process.pid)
    finally:
        gateway.stop()
    figures = {"idle_rss_mib": idle, "after_rss_mib": after, "growth_mib": after - idle, "requests": args.requests,
               "failures": failures, "seconds": seconds, "requests_per_s": args.requests / seconds}  # fmt: skip
    rows = [["idle", f"{idle:.1f}"], [f"after {args.requests:,} requests", f"{after:.1f}"],
            ["growth", f"{after - idle:+.1f}"]]  # fmt: skip
    table = markdown_table(["gateway (default model)", "RSS MiB"], rows)
    table += f"\n\n{failures} failed; {args.requests / seconds:.0f} requests/s at concurrency {args.concurrency}."
    write_result("bench_memory", {"machine": machine(), "settings": vars(args), "summary": figures}, table)


if __name__ == "__main__":
    main()
