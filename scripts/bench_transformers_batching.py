#!/usr/bin/env python3
"""Concurrent requests on the transformers engine: its worker-thread queue against transformers' own
continuous batching, on the model the engine loads by default.

Both run in this process, each on its own copy of the weights: (a) `TransformersEngine.generate`, what the
gateway serves (one forward per running sequence per step, each with its own KV cache); (b) transformers'
`ContinuousBatchingManager` (`model.init_continuous_batching()`, paged KV cache, all running sequences in one
forward), fed with `add_request(streaming=True)` and read through `register_result_handler`, so its tokens
reach the event loop as the engine's do. Every request: the same chat prompt, `max_tokens` greedy tokens,
end-of-text ignored, all requests sent at once. For each concurrency every repetition runs both, the first
alternating, so load from other processes hits both alike. Aggregate = all tokens / wall time from sending
to the last token; TTFT from sending to the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import machine, markdown_table, median, percentile, ratio, write_result  # noqa: E402
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig  # noqa: E402

from engines.base import EngineConfig, SamplingParams  # noqa: E402
from engines.transformers import TransformersEngine  # noqa: E402
from engines.transformers.engine import pretrained_source  # noqa: E402
from gateway.models.registry import ModelRegistry  # noqa: E402
from gateway.settings import Settings  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
QUEUE, BATCHING = "queue", "continuous-batching"


@dataclass
class Stream:
    ttft: float
    end: float  # seconds from sending to the last token
    tokens: int


def default_model() -> Path:
    """What `LLM_ENGINE=transformers make run` loads: LLM_MODEL resolved as the gateway resolves it."""
    settings = Settings()
    return Path(ModelRegistry.load(settings.registry).resolve(settings.model, settings.models_dir).path)


# ---- (a) the engine's queue ------------------------------------------------------------------


async def queue_streams(engine: TransformersEngine, prompt, concurrency: int, max_tokens: int) -> list[Stream]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sent = time.perf_counter()

    async def one() -> Stream:
        first, tokens = None, 0
        async for delta in engine.generate(prompt, params):
            first = first or time.perf_counter() - sent
            tokens += delta.tokens
        return Stream(first, time.perf_counter() - sent, tokens)

    return await asyncio.gather(*(one() for _ in range(concurrency)))


# ---- (b) transformers' continuous batching ---------------------------------------------------


def batching_manager(model_path: Path, max_tokens: int, concurrency: int, prompt_tokens: int):
    source, extra = pretrained_source(model_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", **extra).eval()
    generation = GenerationConfig(max_new_tokens=max_tokens, do_sample=False)
    # Sized for this workload: left to itself the paged cache takes 90 % of free memory, here shared RAM.
    blocks_per_request = -(-(prompt_tokens + max_tokens) // 256)  # pages of 256 tokens, the default size
    sizing = ContinuousBatchingConfig(
        num_blocks=2 * concurrency * blocks_per_request, max_batch_tokens=max(512, concurrency * prompt_tokens)
    )
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=sizing)
    manager.start()
    return manager


async def batching_streams(manager, prompt_ids: list[int], concurrency: int, max_tokens: int,
                           ids: itertools.count) -> list[Stream]:  # fmt: skip
    sent = time.perf_counter()

    async def one() -> Stream:
        request_id, outputs = f"bench-{next(ids)}", asyncio.Queue()
        manager.register_result_handler(request_id, outputs.put_nowait)  # before the request: no output missed
        # eos_token_id=-1: no end-of-text token, as ignore_eos does for the engine.
        manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=max_tokens, streaming=True,
                            eos_token_id=-1)  # fmt: skip
        first = None
        while True:
            output = await outputs.get()
            first = first or time.perf_counter() - sent
            if output.error:
                raise RuntimeError(f"continuous batching failed: {output.error}")
            if output.is_finished():
                return Stream(first, time.perf_counter() - sent, len(output.generated_tokens))

    return await asyncio.gather(*(one() for _ in range(concurrency)))


# ---- the run ---------------------------------------------------------------------------------


def summary(runs: list[list[Stream]]) -> dict:
    """Medians over repetitions of each run's aggregate tok/s and TTFT p50."""
    aggregates = [sum(s.tokens for s in run) / max(s.end for s in run) for run in runs]
    ttfts = [percentile([s.ttft for s in run], 50) * 1000 for run in runs]
    return {"aggregate_tok_s": median(aggregates), "ttft_p50_ms": median(ttfts), "runs_tok_s": aggregates,
            "runs_ttft_p50_ms": ttfts, "tokens": [sum(s.tokens for s in run) for run in runs]}  # fmt: skip


async def measure(args) -> dict:
    engine = TransformersEngine(EngineConfig(model_path=str(args.model), served_name="bench",
                                             parallel=max(args.concurrency)))  # fmt: skip
    await engine.load()
    prompt = await engine.render_chat([{"role": "user", "content": PROMPT}])
    manager = batching_manager(args.model, args.max_tokens, max(args.concurrency), len(prompt.token_ids))
    ids = itertools.count()
    sides = {
        QUEUE: lambda n: queue_streams(engine, prompt, n, args.max_tokens),
        BATCHING: lambda n: batching_streams(manager, prompt.token_ids, n, args.max_tokens, ids),
    }
    try:
        return await alternate(sides, args.concurrency, args.reps)
    finally:
        manager.stop(block=True, timeout=30)
        await engine.close()


async def alternate(sides: dict, concurrencies: list[int], reps: int) -> dict:
    """Every repetition runs both sides, the first one alternating; the load average is read before each run."""
    for side in sides.values():  # warm-up: first calls pay for lazy initialisation
        await side(1)
    results, loads = {}, []
    for concurrency in concurrencies:
        runs = {name: [] for name in sides}
        for rep in range(reps):
            for name in list(sides) if rep % 2 == 0 else list(reversed(sides)):
                loads.append(os.getloadavg()[0])
                runs[name].append(await sides[name](concurrency))
            last = {name: round(summary(r[-1:])["aggregate_tok_s"], 1) for name, r in runs.items()}
            print(f"{concurrency} concurrent, repetition {rep + 1}: {last} tok/s", flush=True)
        results[concurrency] = {name: summary(r) for name, r in runs.items()}
    return {"results": results, "load_average_1m": {"min": min(loads), "median": median(loads), "max": max(loads)}}


def table(results: dict) -> str:
    rows = []
    for concurrency, sides in results.items():
        ours, theirs = sides[QUEUE], sides[BATCHING]
        aggregate = f"{ratio(ours['aggregate_tok_s'], theirs['aggregate_tok_s']):.2f}x"
        ttft = f"{ratio(ours['ttft_p50_ms'], theirs['ttft_p50_ms']):.2f}x"
        rows.append([concurrency, QUEUE, ours["aggregate_tok_s"], ours["ttft_p50_ms"], aggregate, ttft])
        rows.append([concurrency, BATCHING, theirs["aggregate_tok_s"], theirs["ttft_p50_ms"], "", ""])
    header = ["concurrent", "path", "aggregate tok/s", "TTFT p50 ms", "queue/batching tok/s", "queue/batching TTFT"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the gateway's LLM_MODEL")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    args.model = args.model or default_model()
    measured = asyncio.run(measure(args))
    result = {"machine": machine(), "model": str(args.model), "max_tokens": args.max_tokens, **measured}
    load = measured["load_average_1m"]
    notes = f"\n\n1-minute load average in the run: {load['min']:.1f}–{load['max']:.1f} (median {load['median']:.1f})"
    write_result("bench_transformers_batching", result, table(measured["results"]) + notes)


if __name__ == "__main__":
    main()
