#!/usr/bin/env python3
"""Concurrent streaming load against a running gateway: requests/s, TTFT and latency percentiles, tokens/s.

    python scripts/load_test.py --url http://127.0.0.1:8000/v1 --requests 64 --concurrency 8

Each request is a streamed chat completion with `stream_options.include_usage`, so token counts are the
server's own. Exits 1 when any request failed (an HTTP error, a broken stream, or an error event).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm


@dataclass
class Outcome:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    completion_tokens: int = 0
    error: str | None = None


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, index: int) -> Outcome:
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": f"{args.prompt} (request {index})"}],
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    outcome = Outcome(ok=False)
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Outcome(ok=False, error=f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                _read_event(json.loads(line[6:]), outcome, time.perf_counter() - started)
    except httpx.HTTPError as error:
        return Outcome(ok=False, error=f"{type(error).__name__}: {error}")
    outcome.latency = time.perf_counter() - started
    outcome.ok = outcome.error is None
    return outcome


def _read_event(event: dict, outcome: Outcome, elapsed: float) -> None:
    if "error" in event:
        outcome.error = event["error"].get("message", "error event in stream")
    if outcome.ttft is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
        outcome.ttft = elapsed
    if event.get("usage"):
        outcome.completion_tokens = event["usage"]["completion_tokens"]


async def run(args: argparse.Namespace) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=args.timeout) as client:
        with tqdm(total=args.requests, desc="requests", unit="req", file=sys.stderr, disable=args.quiet) as bar:

            async def bounded(index: int) -> Outcome:
                async with gate:
                    outcome = await one_request(client, args, index)
                bar.update(1)
                return outcome

            started = time.perf_counter()
            outcomes = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
    return outcomes, time.perf_counter() - started


def percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        only = values[0] if values else None
        return {"p50": only, "p90": only, "p99": only}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    done = [o for o in outcomes if o.ok]
    tokens = sum(o.completion_tokens for o in done)
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(done),
        "wall_seconds": wall,
        "requests_per_second": len(done) / wall,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / wall,
        "ttft_seconds": percentiles([o.ttft for o in done if o.ttft is not None]),
        "latency_seconds": percentiles([o.latency for o in done]),
        "first_errors": [o.error for o in outcomes if not o.ok][:5],
    }


def print_report(report: dict) -> None:
    def row(name: str, cuts: dict) -> str:
        shown = "  ".join(f"{k} {v * 1000:8.1f} ms" if v is not None else f"{k} -" for k, v in cuts.items())
        return f"{name:<12}{shown}"

    print(f"requests    {report['requests']} in {report['wall_seconds']:.1f}s, {report['errors']} errors")
    print(f"throughput  {report['requests_per_second']:.2f} req/s, {report['tokens_per_second']:.1f} tokens/s "
          f"({report['completion_tokens']} completion tokens)")  # fmt: skip
    print(row("TTFT", report["ttft_seconds"]))
    print(row("latency", report["latency_seconds"]))
    for error in report["first_errors"]:
        print(f"error: {error}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LOAD_TEST_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--model", default=os.environ.get("LOAD_TEST_MODEL", "smollm2-135m-instruct"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Write a short story about a lighthouse.")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "load-test"))
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = summarize(*asyncio.run(run(args)))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
