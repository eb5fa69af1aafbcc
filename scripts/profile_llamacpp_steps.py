"""Where a llama.cpp engine step goes: the scheduler's parts, per step.

Runs the engine in process (no HTTP), streams of `max_tokens` 128 with EOS ignored, greedy, at 1, 8 and 16
concurrent streams, and prints each timed part's microseconds per step (a step: one token for every stream).
Timers wrap the scheduler's methods, so the figures include their ~1 µs each. `_run_in_c` is the C steps
(llama_decode, sampling) as one call; what is outside it is Python on the engine's thread. Usage:
    python scripts/profile_llamacpp_steps.py MODEL.gguf [--gpu-layers 99] [--threads 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # scripts/ is on the path already, as the script's own folder

from bench_streams import PROMPT  # noqa: E402

from engines.base import EngineConfig, SamplingParams  # noqa: E402
from engines.llamacpp import scheduler  # noqa: E402
from engines.llamacpp.engine import LlamaCppEngine  # noqa: E402

spent: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()


def timed(holder, name: str, label: str) -> None:
    original = getattr(holder, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(holder, name, wrapper)


for method in ("_take_inbox", "_admit", "_run_in_c", "_step_in_python", "_collect", "_flush_outbox"):
    timed(scheduler.Scheduler, method, method)


async def stream(engine, prompt, arrivals: list[float]) -> None:
    async for _ in engine.generate(prompt, SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)):
        arrivals.append(time.perf_counter())


async def main(args) -> None:
    config = EngineConfig(
        model_path=args.model, served_name="profile", context_length=1024, threads=args.threads,
        gpu_layers=args.gpu_layers, parallel=16, embedding=False, options={"enable_prefix_caching": False},
    )  # fmt: skip
    engine = LlamaCppEngine(config)
    await engine.load()
    prompt = await engine.encode_prompt(PROMPT)
    for streams in (1, 1, 8, 8, 16):
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        tasks = [asyncio.create_task(stream(engine, prompt, a)) for a in arrivals]
        while not all(arrivals):  # time the decoding steps only, from every stream's first token on
            await asyncio.sleep(0.0005)
        spent.clear()
        calls.clear()
        start = time.perf_counter()
        await asyncio.gather(*tasks)
        steps = min(len(a) for a in arrivals) - 1
        wall = max(a[-1] for a in arrivals) - start
        parts = ", ".join(f"{label} {seconds / steps * 1e6:.0f}" for label, seconds in spent.items())
        print(f"{streams} streams, {steps} steps: {wall / steps * 1e6:.0f} µs a step; {parts}; "
              f"outside C {(wall - spent['_run_in_c']) / steps * 1e6:.0f}", flush=True)  # fmt: skip
    await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    import uvloop  # the loop the gateway runs on (uvicorn[standard])

    uvloop.install()
    asyncio.run(main(parser.parse_args()))
