"""Benchmark 1: decode throughput and time to first token of the gateway's llama.cpp engine against
llama-server (same vendored llama.cpp, same CPU flags) and llama-cpp-python's own server, on the same
model, threads and context, at several numbers of concurrent streams.

All servers run side by side; every repetition measures each of them in turn (the order rotates), so
load from other processes on the machine hits all of them alike. Two workloads (`--workload`):
- `chat` (the default, what users run): each stream is one streamed /v1/chat/completions request with its own
  prompt and seed, sampled at temperature 0.8 with top_k 40, top_p 0.95 and min_p 0.05 sent to every server
  (llama-server's defaults, which it applies when a client leaves them out; the gateway, as OpenAI, applies
  none), `max_tokens` tokens, EOS ignored;
- `greedy`: each stream is one streamed /v1/completions request for one fixed prompt, greedy, EOS ignored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, Service  # noqa: E402
from bench_streams import ALIAS, PROMPT, US, add_stream_arguments, chat_prompt, run_benchmark  # noqa: E402


def gateway(args) -> Service:
    env = {
        "LLM_MODEL": str(args.model), "LLM_SERVED_MODEL_NAME": ALIAS, "LLM_THREADS": str(args.threads),
        "LLM_CTX": str(args.ctx), "LLM_PARALLEL": str(args.parallel), "LLM_GPU_LAYERS": str(args.gpu_layers),
        "LLM_BATCH_SIZE": str(args.batch_size), "LLM_EMBEDDING": "false", "LLM_LOG_LEVEL": "warning",
        # Prefix reuse only when llama-server gets its prompt cache too: the same prefill work for both.
        "LLM_ENABLE_PREFIX_CACHING": str(args.prompt_cache).lower(),
        "LLM_UNLOAD_AFTER_SECONDS": "0",  # the peers never unload their model
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


# The sampling of the chat workload, sent to every server alike.
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def request_body(peer: str, number: int, args, eog_ids: list[int]) -> dict:
    body = {"model": ALIAS, "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if args.workload == "chat":
        body.update(SAMPLING, messages=[{"role": "user", "content": chat_prompt(number)}], seed=number)
    else:
        body.update(prompt=PROMPT, temperature=0)
    if peer == "llama-cpp-python":  # no ignore_eos there: forbid the end-of-generation tokens instead
        body["logit_bias"] = {str(token): -100.0 for token in eog_ids}
    else:
        body["ignore_eos"] = True
    if peer == "llama-server":  # the same prefill work for every engine: no reuse of the last prompt's KV
        body["cache_prompt"] = args.prompt_cache
    return body


def eog_tokens(model: Path) -> list[int]:
    """The tokens the engine counts as ending generation, for the peers' ignore-EOS biases."""
    import llama_cpp

    sys.path.insert(0, str(ROOT))
    from engines.llamacpp.native import Vocab

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    handle = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    ids = sorted(Vocab(handle).eog_ids)
    llama_cpp.llama_model_free(handle)
    return ids


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary (scripts/build_llama_server.sh)")
    parser.add_argument("--llama-cpp-python", default=sys.executable, help="python with llama_cpp.server")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from: " + ", ".join(PEERS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=1024, help="context per stream (slot)")
    parser.add_argument("--parallel", type=int, default=16, help="slots on the gateway and llama-server")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--prompt-cache", action="store_true", help="let llama-server and the gateway reuse prompt KV")
    parser.add_argument("--workload", choices=("chat", "greedy"), default="chat",
                        help="chat: sampled chat completions, distinct prompts; greedy: completions of one prompt")
    add_stream_arguments(parser, "bench_llamacpp")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    services = [PEERS[name](args) for name in args.peers.split(",")]
    eog_ids = eog_tokens(args.model)
    run_benchmark(services, args, lambda peer, number: request_body(peer, number, args, eog_ids))


if __name__ == "__main__":
    main()
