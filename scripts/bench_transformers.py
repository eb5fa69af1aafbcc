#!/usr/bin/env python3
"""Load time, GPU memory and decode speed of the transformers engine per LLM_QUANTIZATION.

Drives the engine class itself (no HTTP), so the figures are the engine's: one greedy request of
`--tokens` tokens with end-of-text ignored, after one short warm-up request.
Usage: python scripts/bench_transformers.py MODEL_PATH --quantization int8 int4
No model hub on the GPU machine: `--random-from TOKENIZER_DIR` first writes a random-weight 1.1B Llama
(TinyLlama's shape) with that tokenizer and chat template to MODEL_PATH; speed does not depend on weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engines.base import EngineConfig, SamplingParams  # noqa: E402
from engines.transformers import TransformersEngine  # noqa: E402


async def measure(model: str, quantization: str | None, tokens: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = EngineConfig(model_path=model, served_name="bench", options={"quantization": quantization})
    engine = TransformersEngine(config)
    started = time.perf_counter()
    await engine.load()
    load_s = time.perf_counter() - started
    prompt = await engine.render_chat([{"role": "user", "content": "Tell me a long story about a lighthouse."}])
    await _generate(engine, prompt, 8)
    started = time.perf_counter()
    produced = await _generate(engine, prompt, tokens)
    decode_s = time.perf_counter() - started
    result = {
        "quantization": quantization or "auto",
        "load_s": round(load_s, 1),
        "weights_gib": round(engine.info().memory_bytes / 2**30, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "tokens": produced,
        "tokens_per_s": round(produced / decode_s, 1),
    }
    await engine.close()
    return result


def build_random_llama(target: str, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model


async def _generate(engine, prompt, count: int) -> int:
    params = SamplingParams(max_tokens=count, temperature=0.0, ignore_eos=True)
    return sum([delta.tokens async for delta in engine.generate(prompt, params)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--quantization", nargs="+", default=["bfloat16", "int8", "int4"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--random-from", metavar="TOKENIZER_DIR")
    args = parser.parse_args()
    if args.random_from:
        build_random_llama(args.model, args.random_from)
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    for quantization in args.quantization:
        print(json.dumps(asyncio.run(measure(args.model, quantization, args.tokens))), flush=True)


if __name__ == "__main__":
    main()
