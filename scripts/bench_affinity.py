"""Benchmark 6: prefix affinity in an engine pool. A multi-turn chat workload through the gateway to a pool of N
llama-server processes (each with its prompt cache: slots, and `--cache-ram` for the states of conversations it
set aside), once per balance: `affinity` against `round_robin` and `least_outstanding` (docs/routing.md#engine-pools).

The load is open: conversations arrive at `--rate` per second (Poisson arrivals, the same schedule for every balance),
so every balance serves the same work in about the same time and the TTFTs compare at equal throughput (a fixed
number of conversations at once would hand the faster balance more requests, which then queue). Every conversation
opens with one shared system prompt and its own first user turn, then goes on for `--turns` turns, each a streamed
chat request whose messages hold the whole conversation so far (the answers as the engine streamed them), the next
sent `--think` seconds after the answer ended. Each balance gets conversations of its own (the same sizes, other
words), so no run finds another's conversations in the caches; the shared system prompt is cached on every server
before the first run. Answers are greedy and `--max-tokens` long (EOS ignored), so every balance decodes the same
number of tokens. Reported per balance: TTFT p50 and p99 (all turns, and follow-up turns alone), completion tokens
per second over the run's wall time, the share of prompt tokens the servers found in their caches (llama-server's
`timings`), requests per endpoint; and each balance's ratios against round robin.

The defaults (4 servers of 3 threads) suit a 16-core machine; on fewer cores lower `--servers`, `--threads` and
`--rate` together, keeping round robin's throughput level with affinity's (else round robin queues and the TTFTs
compare overload, not caches).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    ROOT,
    Service,
    exit_on_sigterm,
    machine,
    markdown_table,
    percentile,
    ratio,
    stop_all,
    write_result,
)

POLICIES = ("affinity", "round_robin", "least_outstanding")
BASELINE = "round_robin"
ALIAS = "bench"
SUBJECTS = (
    "a delayed parcel", "a broken laptop hinge", "a double charge on a card", "a lost hotel booking",
    "a router that drops Wi-Fi", "a missing refund", "a locked account", "a late train ticket refund",
)  # fmt: skip


def system_prompt(words: int) -> str:
    """The prompt every conversation opens with: numbered house rules, about `words` words."""
    rules = []
    while sum(len(rule.split()) for rule in rules) < words:
        n = len(rules) + 1
        rules.append(f"Rule {n}: answer the customer politely, cite policy section {n * 7 % 97}, never promise a "
                     f"refund above {n * 13 % 500} euros, and end with a short summary of the next step.")  # fmt: skip
    return "You are the support assistant of an online shop. " + " ".join(rules)


def user_turn(conversation: int, turn: int, words: int) -> str:
    """A user turn of about `words` words, its own to its conversation and turn."""
    subject = SUBJECTS[conversation % len(SUBJECTS)]
    opening = f"Customer {conversation}, message {turn + 1}, about {subject}:"
    details = " ".join(f"detail{(conversation * 31 + turn * 7 + i) % 1000}" for i in range(words))
    return f"{opening} {details}. What should I do now?"


@dataclass
class Turn:
    conversation: int
    number: int  # from 0
    ttft: float  # seconds from sending to the first streamed text
    tokens: int
    prompt_n: int | None  # prompt tokens the server processed, and ...
    cache_n: int | None  # ... those it found in its cache (llama-server's timings)


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=1800)


async def one_turn(api: openai.AsyncOpenAI, policy: str, messages: list[dict], args) -> tuple[float, str, dict, int]:
    """A streamed chat request: seconds to its first text, the text, the server's timings, completion tokens."""
    sent = time.perf_counter()
    first = None
    pieces: list[str] = []
    timings: dict = {}
    tokens = 0
    stream = await api.chat.completions.create(
        model=policy, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        timings = (chunk.model_extra or {}).get("timings") or timings  # llama-server's, passed on by the gateway
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                pieces.append(choice.delta.content)
    if first is None:
        raise RuntimeError(f"no text streamed through {policy}")
    return first - sent, "".join(pieces), timings, tokens or len(pieces)


async def converse(api: openai.AsyncOpenAI, policy: str, conversation: int, start: float, args) -> list[Turn]:
    """One conversation, from `start` (a perf_counter time), its turns `args.think` seconds apart."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    messages = [{"role": "system", "content": system_prompt(args.system_words)}]
    turns = []
    for number in range(args.turns):
        if number:
            await asyncio.sleep(args.think)
        messages.append({"role": "user", "content": user_turn(conversation, number, args.user_words)})
        ttft, text, timings, tokens = await one_turn(api, policy, messages, args)
        turns.append(Turn(conversation, number, ttft, tokens, timings.get("prompt_n"), timings.get("cache_n")))
        messages.append({"role": "assistant", "content": text})
    return turns


def arrivals(args) -> list[float]:
    """Seconds from a run's start at which its conversations arrive: a Poisson process of `args.rate` per second,
    the same for every balance and repetition."""
    draw = random.Random(args.seed)
    times, now = [], 0.0
    for _ in range(args.conversations):
        times.append(now)
        now += draw.expovariate(args.rate)
    return times


async def run_policy(base_url: str, policy: str, conversations: range, args) -> dict:
    """Every conversation of `conversations` through the gateway's `policy` model, arriving as `arrivals` says."""
    started = time.perf_counter()
    async with client(base_url) as api:
        runs = await asyncio.gather(*(converse(api, policy, conversation, started + offset, args)
                                      for conversation, offset in zip(conversations, arrivals(args))))  # fmt: skip
    return {"wall": time.perf_counter() - started, "turns": [vars(turn) for run in runs for turn in run]}


async def warm(servers: list[Service], args) -> None:
    """The shared system prompt into every server's cache, as a long-running pool would have it."""
    messages = [{"role": "system", "content": system_prompt(args.system_words)}, {"role": "user", "content": "Hello."}]
    for server in servers:
        async with client(server.base_url) as api:
            await api.chat.completions.create(model=ALIAS, messages=messages, max_tokens=1)


def llama_server(args, index: int) -> Service:
    service = Service(f"llama-server-{index}", [], "/health")
    service.command = [
        str(args.llama_server), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(service.port),
        "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.slots), "-c", str(args.ctx * args.slots),
        "--cache-ram", str(args.cache_ram), "-a", ALIAS, "--no-webui",
    ]  # fmt: skip
    return service


def gateway(servers: list[Service], policies: list[str], folder: Path) -> Service:
    """One gateway, one pool target (and public model) per balance, all over the same servers."""
    endpoints = [f"{server.base_url}/v1" for server in servers]
    targets = {policy: {"type": "openai", "model": ALIAS, "endpoints": endpoints, "balance": policy,
                        "read_timeout": 600} for policy in policies}  # fmt: skip
    config = folder / "gateway.yaml"
    config.write_text(yaml.safe_dump({"targets": targets, "models": {p: {"targets": [p]} for p in policies}}))
    env = {"LLM_CONFIG": str(config), "LLM_HOST": "127.0.0.1", "LLM_LOG_LEVEL": "warning",
           "LLM_REQUEST_TIMEOUT": "600"}  # fmt: skip
    service = Service("gateway", [sys.executable, "-m", "gateway", "serve"], "/health", '"status":"ok"', env=env)
    service.env["LLM_PORT"] = str(service.port)
    return service


def endpoint_requests(gateway_url: str) -> dict[str, list[int]]:
    """Requests each endpoint of each pool served, from the gateway's /metrics."""
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_endpoint_requests_total":
                counts.setdefault(sample.labels["target"], {})[sample.labels["endpoint"]] = int(sample.value)
    return {target: [by[e] for e in sorted(by, key=int)] for target, by in counts.items()}


def summarize(turns: list[dict], wall: float, served: list[int]) -> dict:
    ttfts = [t["ttft"] for t in turns]
    follow_ups = [t["ttft"] for t in turns if t["number"] > 0]
    prompt = sum(t["prompt_n"] or 0 for t in turns)
    cached = sum(t["cache_n"] or 0 for t in turns)
    return {
        "turns": len(turns),
        "wall_s": wall,
        "completion_tps": sum(t["tokens"] for t in turns) / wall,
        "ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "ttft_p99_ms": percentile(ttfts, 99) * 1000,
        "follow_up_ttft_p50_ms": percentile(follow_ups, 50) * 1000,
        "cached_prompt_share": cached / (prompt + cached) if prompt + cached else float("nan"),
        "requests_per_endpoint": served,
    }


def table(summary: dict) -> str:
    base = summary.get(BASELINE)
    header = ["balance", "turns", "completion tok/s", "TTFT p50 ms", "TTFT p99 ms", "follow-up TTFT p50 ms",
              "prompt tokens cached", "requests per endpoint", f"TTFT p50 / {BASELINE}", f"TTFT p99 / {BASELINE}",
              f"tok/s / {BASELINE}"]  # fmt: skip
    rows = []
    for policy, s in summary.items():
        against = [ratio(s[k], base[k]) if base else float("nan") for k in ("ttft_p50_ms", "ttft_p99_ms",
                                                                             "completion_tps")]  # fmt: skip
        rows.append([policy, s["turns"], s["completion_tps"], s["ttft_p50_ms"], s["ttft_p99_ms"],
                     s["follow_up_ttft_p50_ms"], f"{s['cached_prompt_share']:.0%}",
                     "/".join(map(str, s["requests_per_endpoint"])), *(f"{r:.2f}x" for r in against)])  # fmt: skip
    return markdown_table(header, rows)


def measure(gateway_service: Service, servers: list[Service], args) -> dict:
    asyncio.run(warm(servers, args))
    runs: dict = {policy: [] for policy in args.policies}
    for rep in range(args.reps):
        order = args.policies[rep % len(args.policies) :] + args.policies[: rep % len(args.policies)]
        for k, policy in enumerate(order):
            first = (rep * len(order) + k) * args.conversations  # conversations of its own
            conversations = range(first, first + args.conversations)
            run = asyncio.run(run_policy(gateway_service.base_url, policy, conversations, args))
            runs[policy].append(run)
            s = summarize(run["turns"], run["wall"], [])
            print(f"rep {rep + 1} {policy:<17} {s['completion_tps']:6.1f} tok/s  TTFT p50 {s['ttft_p50_ms']:7.0f} ms "
                  f"p99 {s['ttft_p99_ms']:7.0f} ms  cached {s['cached_prompt_share']:.0%}", flush=True)  # fmt: skip
    served = endpoint_requests(gateway_service.base_url)
    return {policy: {"runs": runs[policy], "served": served[policy]} for policy in runs}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, required=True, help="scripts/build_llama_server.sh builds it")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--servers", type=int, default=4, help="llama-server processes in the pool")
    parser.add_argument("--threads", type=int, default=3, help="threads of each server")
    parser.add_argument("--slots", type=int, default=4, help="parallel slots of each server")
    parser.add_argument("--ctx", type=int, default=3072, help="context per slot")
    parser.add_argument("--cache-ram", type=int, default=1024, help="MiB of set-aside prompt states per server")
    parser.add_argument("--conversations", type=int, default=12, help="per balance and repetition")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.1, help="conversations arriving per second")
    parser.add_argument("--think", type=float, default=1.0, help="seconds between an answer and the next turn")
    parser.add_argument("--seed", type=int, default=0, help="of the arrival times")
    parser.add_argument("--max-tokens", type=int, default=32, help="of each answer")
    parser.add_argument("--system-words", type=int, default=300, help="of the shared system prompt")
    parser.add_argument("--user-words", type=int, default=40, help="of each user turn")
    parser.add_argument("--policies", default=",".join(POLICIES), type=lambda s: s.split(","))
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--name", default="bench_affinity", help="result file name under bench-results/")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    folder = Path(tempfile.mkdtemp(prefix=f"{args.name}-"))
    servers = [llama_server(args, i) for i in range(args.servers)]
    front = gateway(servers, args.policies, folder)
    try:
        for service in [*servers, front]:
            service.start(folder, timeout=args.start_timeout)
        measured = measure(front, servers, args)
    finally:
        stop_all([front, *servers])
    summary = {}
    for policy, data in measured.items():
        turns = [turn for run in data["runs"] for turn in run["turns"]]
        summary[policy] = summarize(turns, sum(run["wall"] for run in data["runs"]), data["served"])
    settings = {k: str(v) for k, v in vars(args).items()}
    result = {"machine": machine(), "settings": settings, "summary": summary, "raw": measured}
    write_result(args.name, result, table(summary))


if __name__ == "__main__":
    main()
