"""Robustness check: rounds of concurrent streams whose arrivals are spread at random, from all at once to
20 ms apart, as clients that are not in step send them. A request that fails, or is left without an answer,
stops the run.

Two targets:
  --url URL     an OpenAI-compatible server (the gateway, llama-server): streamed /v1/completions
  --model GGUF  the llama.cpp engine in this process, without HTTP; every llama_decode is timed, and one that
                runs past --stuck-after is printed with its batch: (sequence, first position, tokens) per group

Run it from a checkout's root: the engine mode imports that checkout's `engines`. On an H200 both targets
found a step that never finished while CUDA graphs were on (docs/benchmarks-history.md, benchmark 1, GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streams import ALIAS, PROMPT  # noqa: E402

SPREADS_S = [0.0, 0.0005, 0.002, 0.005, 0.02]
MAX_TOKENS = [8, 128, 128]
Stream = Callable[[float, int], Awaitable[None]]  # (delay before sending, max_tokens)


async def run_rounds(stream: Stream, args) -> bool:
    """True when every request of every round was answered within args.timeout."""
    rng = random.Random(args.seed)
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < args.seconds:
        spread = rng.choice(SPREADS_S)
        delays = [rng.uniform(0, spread) for _ in range(args.streams)]
        max_tokens = rng.choice(MAX_TOKENS)
        try:
            await asyncio.wait_for(asyncio.gather(*(stream(d, max_tokens) for d in delays)), args.timeout)
        except asyncio.TimeoutError:
            print(f"round {rounds}: a request had no answer after {args.timeout:g} s (arrivals spread over "
                  f"{spread * 1000:.1f} ms, max_tokens {max_tokens})", flush=True)
            return False
        except Exception as error:  # an error status or a failed generation is a finding too
            print(f"round {rounds}: a request failed: {error!r}", flush=True)
            return False
        rounds += 1
    print(f"{rounds} rounds of {args.streams} streams in {time.monotonic() - started:.0f} s: all answered", flush=True)
    return True


# ---- over HTTP ---------------------------------------------------------------------------------


async def stress_server(args) -> bool:
    import aiohttp

    url = args.url.rstrip("/") + "/v1/completions"
    async with aiohttp.ClientSession() as session:

        async def stream(delay: float, max_tokens: int) -> None:
            await asyncio.sleep(delay)
            body = {"model": ALIAS, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                    "ignore_eos": True, **args.body}
            async with session.post(url, json=body) as response:
                response.raise_for_status()
                async for _ in response.content:
                    pass

        return await run_rounds(stream, args)


# ---- in process ----------------------------------------------------------------------------------


class DecodeWatch:
    """Times every llama_decode; a daemon thread reports one that is still running after `limit` seconds."""

    def __init__(self, llama_cpp, limit: float):
        self._decode, self._limit = llama_cpp.llama_decode, limit
        self._started: float | None = None
        self._groups: list[tuple[int, int, int]] = []
        llama_cpp.llama_decode = self
        threading.Thread(target=self._watch, daemon=True).start()

    def __call__(self, ctx, batch):
        self._groups, self._started = _groups(batch), time.monotonic()
        try:
            return self._decode(ctx, batch)
        finally:
            self._started = None

    def _watch(self) -> None:
        reported = None
        while True:
            time.sleep(0.5)
            started = self._started
            if started is not None and started != reported and time.monotonic() - started > self._limit:
                took = time.monotonic() - started
                print(f"a llama_decode has run {took:.1f} s; its batch: {self._groups}", flush=True)
                reported = started


def _groups(batch) -> list[tuple[int, int, int]]:
    """(sequence, first position, tokens) for each run of consecutive positions of one sequence."""
    groups: list[list[int]] = []
    for i in range(batch.n_tokens):
        seq, pos = batch.seq_id[i][0], batch.pos[i]
        if groups and groups[-1][0] == seq and groups[-1][1] + groups[-1][2] == pos:
            groups[-1][2] += 1
        else:
            groups.append([seq, pos, 1])
    return [tuple(group) for group in groups]


async def stress_engine(args) -> bool:
    import llama_cpp

    from engines.base import EngineConfig, SamplingParams
    from engines.llamacpp.engine import LlamaCppEngine

    config = EngineConfig(
        model_path=args.model, served_name=ALIAS, context_length=1024, threads=args.threads,
        gpu_layers=args.gpu_layers, parallel=args.streams, embedding=False,
        options={"enable_prefix_caching": False},
    )
    engine = LlamaCppEngine(config)
    await engine.load()
    DecodeWatch(llama_cpp, args.stuck_after)
    prompt = await engine.encode_prompt(PROMPT)

    async def stream(delay: float, max_tokens: int) -> None:
        await asyncio.sleep(delay)
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)):
            pass

    return await run_rounds(stream, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="an OpenAI-compatible server's base URL")
    target.add_argument("--model", help="a GGUF file for the in-process llama.cpp engine")
    parser.add_argument("--seconds", type=float, default=150, help="how long to keep sending rounds")
    parser.add_argument("--streams", type=int, default=16, help="streams per round (and the engine's slots)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds a round may take")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--body", type=json.loads, default={},
                        help='more request fields (JSON), e.g. \'{"cache_prompt": false}\' for llama-server')
    parser.add_argument("--gpu-layers", type=int, default=99)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--stuck-after", type=float, default=3.0, help="report a llama_decode running this long")
    args = parser.parse_args()
    answered = asyncio.run(stress_engine(args) if args.model else stress_server(args))
    sys.stdout.flush()
    os._exit(0 if answered else 1)  # a stuck engine thread would keep a normal exit waiting


if __name__ == "__main__":
    main()
