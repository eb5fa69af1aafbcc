"""Benchmark 1: decode throughput and time to first token of the gateway's llama.cpp engine against
llama-server (same vendored llama.cpp, same CPU flags) and llama-cpp-python's own server, on the same
model, threads and context, at several numbers of concurrent streams.

All servers run side by side; every repetition measures each of them in turn (the order rotates), so
load from other processes on the machine hits all of them alike. Each stream is one streamed
/v1/completions request for a fixed prompt, `max_tokens` tokens, EOS ignored, greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, Service, exit_on_sigterm, machine, markdown_table, median, percentile, ratio, stop_all, write_result  # noqa: E402

PROMPT = (
    "You are a helpful assistant. Write a long, detailed story about a lighthouse keeper who finds a "
    "message in a bottle, describing the sea, the weather, the keeper's daily routine and the people "
    "of the nearby village. Begin the story now:"
)
ALIAS = "bench"
US = "gateway"


@dataclass
class Stream:
    ttft: float  # seconds from sending the request to the first generated text
    decode_seconds: float  # first to last generated token
    tokens: int


def gateway(args) -> Service:
    env = {
        "LLM_MODEL": str(args.model), "LLM_SERVED_MODEL_NAME": ALIAS, "LLM_THREADS": str(args.threads),
        "LLM_CTX": str(args.ctx), "LLM_PARALLEL": str(args.parallel), "LLM_GPU_LAYERS": str(args.gpu_layers),
        "LLM_BATCH_SIZE": str(args.batch_size), "LLM_EMBEDDING": "false", "LLM_LOG_LEVEL": "warning",
    }
    service = Service(US, [sys.executable, "-m", "gateway", "serve"], "/health", '"status":"ok"', env=env)
    service.env["LLM_PORT"] = str(service.port)
    return service


def llama_server(args) -> Service:
    service = Service("llama-server", [], "/health")
    service.command = [
        str(args.llama_server), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(service.port),
        "-t", str(args.threads), "-tb", str(args.threads), "-c", str(args.ctx * args.parallel),
        "-np", str(args.parallel), "-b", str(args.batch_size), "-ub", str(args.batch_size),
        "-ngl", str(args.gpu_layers), "-a", ALIAS, "--no-webui",
    ]
    return service


def llama_cpp_python(args) -> Service:
    service = Service("llama-cpp-python", [], "/v1/models")
    service.command = [
        args.llama_cpp_python, "-m", "llama_cpp.server", "--model", str(args.model), "--model_alias", ALIAS,
        "--host", "127.0.0.1", "--port", str(service.port), "--n_threads", str(args.threads),
        "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx), "--n_batch", str(args.batch_size),
        "--n_gpu_layers", str(args.gpu_layers), "--interrupt_requests", "false",
    ]
    return service


PEERS = {US: gateway, "llama-server": llama_server, "llama-cpp-python": llama_cpp_python}


def request_body(peer: str, args, eog_ids: list[int]) -> dict:
    body = {
        "model": ALIAS, "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if peer == "llama-cpp-python":  # no ignore_eos there: forbid the end-of-generation tokens instead
        body["logit_bias"] = {str(token): -100.0 for token in eog_ids}
    else:
        body["ignore_eos"] = True
    if peer == "llama-server":  # the same prefill work for every engine: no reuse of the last prompt's KV
        body["cache_prompt"] = args.prompt_cache
    return body


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict) -> Stream:
    sent = time.perf_counter()
    first = last = None
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
            if any(choice.get("text") for choice in event.get("choices") or []):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    if first is None:
        raise RuntimeError(f"no text streamed from {url}")
    return Stream(first - sent, last - first, usage_tokens or chunks)


async def run_streams(service: Service, body: dict, concurrency: int) -> dict:
    url = service.base_url + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(session, url, body) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    tokens = sum(s.tokens for s in streams)
    return {
        "aggregate_tps": tokens / wall,
        "stream_tps": [(s.tokens - 1) / s.decode_seconds for s in streams if s.decode_seconds > 0],
        "ttft": [s.ttft for s in streams],
        "tokens": tokens,
    }


def eog_tokens(model: Path) -> list[int]:
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    handle = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(handle)
    ids = [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    llama_cpp.llama_model_free(handle)
    return ids


def measure(services: list[Service], args) -> dict:
    eog_ids = eog_tokens(args.model)
    raw: dict = {s.name: {c: [] for c in args.concurrency} for s in services}
    for service in services:  # warm-up: first-call allocations stay out of the figures
        asyncio.run(run_streams(service, {**request_body(service.name, args, eog_ids), "max_tokens": 8}, 1))
    for rep in range(args.reps):
        for concurrency in args.concurrency:
            order = services[rep % len(services) :] + services[: rep % len(services)]
            for service in order:
                run = asyncio.run(run_streams(service, request_body(service.name, args, eog_ids), concurrency))
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary (scripts/build_llama_server.sh)")
    parser.add_argument("--llama-cpp-python", default=sys.executable, help="python with llama_cpp.server")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from: " + ", ".join(PEERS))
    parser.add_argument("--concurrency", default="1,4,8,16", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=1024, help="context per stream (slot)")
    parser.add_argument("--parallel", type=int, default=16, help="slots on the gateway and llama-server")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--prompt-cache", action="store_true", help="let llama-server reuse the last prompt's KV")
    parser.add_argument("--name", default="bench_llamacpp", help="result file name under bench-results/")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    services = [PEERS[name](args) for name in args.peers.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    try:
        for service in services:
            service.start(log_dir)
        raw = measure(services, args)
    finally:
        stop_all(services)
    summary = summarize(raw)
    settings = {k: str(v) for k, v in vars(args).items()}
    result = {"machine": machine(), "settings": settings, "summary": summary, "raw": raw}
    write_result(args.name, result, table(summary, args.concurrency))


if __name__ == "__main__":
    main()
