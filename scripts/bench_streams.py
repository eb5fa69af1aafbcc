"""Streaming throughput and time to first token of OpenAI-compatible servers, measured side by side:
what benchmarks 1 (llama.cpp) and 2 (vLLM) share. Each stream is one streamed request, to
/v1/chat/completions when its body has `messages`, else to /v1/completions; aggregate = all generated tokens
/ wall time, per-stream = tokens after the first over its decode time, TTFT = from sending to the first
generated text."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp
from bench_common import (
    RESULTS_DIR,
    Service,
    exit_on_sigterm,
    machine,
    markdown_table,
    median,
    percentile,
    ratio,
    stop_all,
    write_result,
)

PROMPT = (
    "You are a helpful assistant. Write a long, detailed story about a lighthouse keeper who finds a "
    "message in a bottle, describing the sea, the weather, the keeper's daily routine and the people "
    "of the nearby village. Begin the story now:"
)
ALIAS = "bench"
US = "gateway"
# Distinct chat prompts of about the same length: stream i asks about SUBJECTS[i % 16], numbered i.
SUBJECTS = (
    "a lighthouse keeper", "a travelling baker", "a retired astronaut", "a village doctor", "a young cartographer",
    "a night-shift nurse", "a beekeeper", "a ferry captain", "a museum guard", "a mountain guide", "a clockmaker",
    "a librarian", "a fisherman's daughter", "a street musician", "a glassblower", "a railway signalman",
)
RequestBody = Callable[[str, int], dict]  # (server name, stream number) -> the body of that stream's request


def chat_prompt(number: int) -> str:
    return (
        f"Story {number}: write a long, detailed story about {SUBJECTS[number % len(SUBJECTS)]} who finds a message "
        "in a bottle, describing the sea, the weather, the daily routine and the people of the nearby village."
    )


STREAMS_PER_CLIENT = 16  # about what one Python client process keeps up with (../shared/gpu/README.md)


@dataclass
class Stream:
    sent: float  # time.time() of sending the request (comparable across client processes)
    opened: float  # of the first event with a choice (a role-only chunk too): the first token is decoded by then
    first: float  # of the first generated text
    last: float  # of the last generated text
    tokens: int


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict) -> Stream:
    sent = time.time()
    opened = first = last = None
    chunks = usage_tokens = 0
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            opened = opened or (time.time() if event.get("choices") else None)
            if any(_text(choice) for choice in event.get("choices") or []):
                now = time.time()
                first = first or now
                last = now
                chunks += 1
    if first is None:
        raise RuntimeError(f"no text streamed from {url}")
    return Stream(sent, opened, first, last, usage_tokens or chunks)


def _text(choice: dict) -> str | None:
    """What a chunk generated: text, or a tool call's name or arguments."""
    delta = choice.get("delta") or {}
    calls = [call.get("function") or {} for call in delta.get("tool_calls") or []]
    called = "".join(f.get("name", "") + f.get("arguments", "") for f in calls)
    return choice.get("text") or delta.get("content") or called


def client_streams(base_url: str, bodies: list[dict], start_at: float) -> list[Stream]:
    """One client process's share: a stream for each body, all sent at `start_at`."""

    async def run() -> list[Stream]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        timeout = aiohttp.ClientTimeout(total=1800)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*(one_stream(session, _url(base_url, body), body) for body in bodies))

    return asyncio.run(run())


def _url(base_url: str, body: dict) -> str:
    return base_url + ("/v1/chat/completions" if "messages" in body else "/v1/completions")


def run_streams(service: Service, bodies: list[dict], held_tokens: int = 0) -> dict:
    """A stream per body, all at once, from several client processes above STREAMS_PER_CLIENT streams, so
    that the client's own Python is never what limits the figure. `held_tokens`: tokens a stream decodes before
    its first event (a tool call's opening, which the gateway holds until the call's name is whole)."""
    clients = math.ceil(len(bodies) / STREAMS_PER_CLIENT)
    if clients == 1:
        streams = client_streams(service.base_url, bodies, time.time())
    else:
        with ProcessPoolExecutor(clients) as pool:
            start_at = time.time() + 1.0  # every process started and ready
            shares = [bodies[i::clients] for i in range(clients)]
            futures = [pool.submit(client_streams, service.base_url, share, start_at) for share in shares]
            streams = [stream for future in futures for stream in future.result()]
    start = min(s.sent for s in streams)
    wall = max(s.last for s in streams) - start
    tokens = sum(s.tokens for s in streams)
    return {
        "aggregate_tps": tokens / wall,
        # From the first event, not the first text (a reply's text may be held after its role chunk), counting
        # only the tokens decoded after it.
        "stream_tps": [(s.tokens - 1 - held_tokens) / (s.last - s.opened) for s in streams if s.last > s.opened],
        "stream_tokens": [s.tokens for s in streams],  # in the bodies' order
        "ttft": [s.first - s.sent for s in streams],
        "tokens": tokens,
        "wall": wall,
        # when each stream's first and last text came, from the first request's sending: a late stream sets wall
        "first_offsets": [s.first - start for s in streams],
        "last_offsets": [s.last - start for s in streams],
    }


def measure(services: list[Service], args, request_body: RequestBody) -> dict:
    """Every service at every concurrency, `args.reps` times, the order rotating each repetition; in one
    repetition every service gets the same requests (prompts and seeds)."""
    raw: dict = {s.name: {c: [] for c in args.concurrency} for s in services}

    def bodies(service: Service, first: int, count: int, **override) -> list[dict]:
        return [{**request_body(service.name, first + i), **override} for i in range(count)]

    # Warm-up at every concurrency: first-call allocations, and on a GPU each batch shape's first kernels
    # (40-50 ms more TTFT for every server in a 4- or 8-stream run's first repetition), stay out of the figures.
    for service in services:
        for concurrency in args.concurrency:
            run_streams(service, bodies(service, 0, concurrency, max_tokens=8))
    for rep in range(args.reps):
        for concurrency in args.concurrency:
            order = services[rep % len(services) :] + services[: rep % len(services)]
            for service in order:
                run = run_streams(service, bodies(service, (rep + 1) * 1000 + concurrency, concurrency))
                raw[service.name][concurrency].append(run)
                print(
                    f"rep {rep + 1} c={concurrency:>2} {service.name:<17} {run['aggregate_tps']:7.1f} tok/s "
                    f"ttft p50 {percentile(run['ttft'], 50) * 1000:7.1f} ms",
                    flush=True,
                )
    return raw


def summarize(raw: dict) -> dict:
    summary: dict = {}
    for peer, by_concurrency in raw.items():
        for concurrency, runs in by_concurrency.items():
            ttfts = [t for run in runs for t in run["ttft"]]
            summary.setdefault(peer, {})[concurrency] = {
                "aggregate_tps": median([run["aggregate_tps"] for run in runs]),
                "stream_tps": median([t for run in runs for t in run["stream_tps"]]),
                "ttft_p50_ms": percentile(ttfts, 50) * 1000,
                "ttft_p99_ms": percentile(ttfts, 99) * 1000,
                "runs": len(runs),
            }
    return summary


def table(summary: dict, concurrencies: list[int]) -> str:
    peers = [p for p in summary if p != US]
    header = ["streams", "engine", "aggregate tok/s", "per-stream tok/s", "TTFT p50 ms", "TTFT p99 ms"]
    header += [f"{US}/{p} aggregate" for p in peers] + [f"{US}/{p} TTFT p50" for p in peers]
    rows = []
    for concurrency in concurrencies:
        ours = summary[US][concurrency]
        for peer in summary:
            s = summary[peer][concurrency]
            row = [concurrency, peer, s["aggregate_tps"], s["stream_tps"], s["ttft_p50_ms"], s["ttft_p99_ms"]]
            if peer == US:
                row += [f"{ratio(ours['aggregate_tps'], summary[p][concurrency]['aggregate_tps']):.2f}x" for p in peers]
                row += [f"{ratio(ours['ttft_p50_ms'], summary[p][concurrency]['ttft_p50_ms']):.2f}x" for p in peers]
            else:
                row += [""] * (2 * len(peers))
            rows.append(row)
    return markdown_table(header, rows)


def run_benchmark(services: list[Service], args, request_body: RequestBody, after=None) -> None:
    """Start every service, measure them in turn, stop them, and write `bench-results/<args.name>.*`;
    `after(services)`, if given, runs between the measuring and the stopping."""
    exit_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix=f"{args.name}-"))
    try:
        for service in services:
            service.start(log_dir, timeout=args.start_timeout)
        raw = measure(services, args, request_body)
        if after is not None:
            after(services)
    finally:
        stop_all(services)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        for service in services:  # the servers' logs (engine config lines) beside the results
            if (log_dir / f"{service.name}.log").exists():
                shutil.copy(log_dir / f"{service.name}.log", RESULTS_DIR / f"{args.name}-{service.name}.log")
    summary = summarize(raw)
    settings = {k: str(v) for k, v in vars(args).items()}
    result = {"machine": machine(), "settings": settings, "summary": summary, "raw": raw}
    write_result(args.name, result, table(summary, args.concurrency))


def add_stream_arguments(parser, name: str) -> None:
    """The options every streaming benchmark takes."""
    parser.add_argument("--concurrency", default="1,4,8,16", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds a server may take to be ready")
    parser.add_argument("--name", default=name, help="result file name under bench-results/")
