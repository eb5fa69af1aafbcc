"""Benchmark 5: decoding under a JSON constraint against free decoding, per engine, and against llama-server
given the same grammar.

Two constrained workloads, each a streamed chat completion sampled as benchmark 1's chat workload (temperature
0.8, top_k 40, top_p 0.95, min_p 0.05, a seed per request): `json_schema` (a `response_format` with a nested schema)
and `tool_call` (a forced call of a function with the same nested parameters). Each constrained run is followed by
free decoding (no constraint, EOS ignored) of the same prompts and seeds to the same lengths, stream for stream: a
stream's speed depends on how many streams decode beside it, so both must end alike. The figure compared is each
stream's decode speed (tokens after the first event over the time to the last piece). llama-server gets the
gateway's own GBNF for the same schema (`grammar`), so both enforce the same grammar. Servers are measured in turn,
the order rotating each repetition.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import ROOT, Service, exit_on_sigterm, machine, markdown_table, median, ratio, stop_all, write_result  # noqa: E402
from bench_llamacpp import SAMPLING, llama_server  # noqa: E402
from bench_schemas import INVENTORY, TOOL  # noqa: E402
from bench_streams import ALIAS, chat_prompt, run_streams  # noqa: E402

from engines.base import ToolCallConstraint  # noqa: E402

WORKLOADS = ("free", "json_schema", "tool_call")
CONSTRAINED = WORKLOADS[1:]
# The generic tool format's call section (gateway/core/tool_calls.py), as the gateway asks it of the default model.
CALL = ToolCallConstraint(
    schema={"type": "object", "properties": {"name": {"const": "save_inventory"}, "arguments": INVENTORY},
            "required": ["name", "arguments"]},
    begin="<tool_call>\n", end="\n</tool_call>",
)  # fmt: skip


def gateway(engine: str, args) -> Service:
    model = args.hf_model if engine != "llamacpp" else args.model
    env = {
        "LLM_ENGINE": engine, "LLM_MODEL": str(model), "LLM_SERVED_MODEL_NAME": ALIAS,
        "LLM_THREADS": str(args.threads), "LLM_CTX": str(args.ctx), "LLM_PARALLEL": str(args.parallel),
        "LLM_EMBEDDING": "false", "LLM_LOG_LEVEL": "warning", "LLM_ENABLE_PREFIX_CACHING": "false",
        "LLM_UNLOAD_AFTER_SECONDS": "0", "LLM_DTYPE": "float32",
    }
    python = args.vllm_python if engine == "vllm" else sys.executable
    service = Service(f"gateway-{engine}", [python, "-m", "gateway", "serve"], "/health", '"status":"ok"', env=env)
    service.env["LLM_PORT"] = str(service.port)
    return service


def request_body(server: str, workload: str, number: int, args) -> dict:
    body = {
        "model": ALIAS, "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Make an inventory for this story. " + chat_prompt(number)}],
        "seed": number, **SAMPLING,
    }  # fmt: skip
    if workload == "free":
        body["ignore_eos"] = True
    elif server == "llama-server":  # the same grammar the gateway's llama.cpp engine enforces
        from engines.llamacpp.native import json_grammar, tool_call_grammar  # llama.cpp only where it is a peer

        body["grammar"] = json_grammar(INVENTORY) if workload == "json_schema" else tool_call_grammar(CALL)
    elif workload == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "inventory", "schema": INVENTORY}}
    else:
        body.update(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "save_inventory"}})
    return body


# What the gateway decodes of a forced call before its first event: the call's opening, up to the arguments.
CALL_OPENING = CALL.begin + '{"name":"save_inventory","arguments":'


def held_tokens(service: Service, workload: str) -> int:
    """Tokens a gateway's stream decodes before its first event: a tool call's opening (llama-server, given the
    grammar alone, streams it as text)."""
    if workload != "tool_call" or service.name == "llama-server":
        return 0
    body = json.dumps({"model": ALIAS, "prompt": CALL_OPENING, "add_special_tokens": False}).encode()
    request = urllib.request.Request(service.base_url + "/tokenize", body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["count"]


def measure(services: list[Service], args) -> dict:
    """Each constrained run, then free decoding of the same prompts and seeds to the same lengths, stream for stream:
    a stream's speed depends on how many others decode beside it, so both must end alike."""
    raw: dict = {s.name: {w: {"constrained": [], "free": []} for w in CONSTRAINED} for s in services}
    for service in services:  # warm-up (whole answers: a call cut short streams nothing)
        run_streams(service, [request_body(service.name, w, 0, args) for w in WORKLOADS])
    held = {(s.name, w): held_tokens(s, w) for s in services for w in CONSTRAINED}
    for rep in range(args.reps):
        for service in services[rep % len(services) :] + services[: rep % len(services)]:
            for workload in CONSTRAINED:
                numbers = [(rep + 1) * 100 + i for i in range(args.streams)]
                bodies = [request_body(service.name, workload, n, args) for n in numbers]
                constrained = run_streams(service, bodies, held[service.name, workload])
                free = [{**request_body(service.name, "free", n, args), "max_tokens": tokens}
                        for n, tokens in zip(numbers, constrained["stream_tokens"])]  # fmt: skip
                unconstrained = run_streams(service, free)
                raw[service.name][workload]["constrained"].append(constrained)
                raw[service.name][workload]["free"].append(unconstrained)
                print(f"rep {rep + 1} {service.name:<20} {workload:<11} {median(constrained['stream_tps']):7.1f} "
                      f"tok/s per stream, free {median(unconstrained['stream_tps']):7.1f} "
                      f"({constrained['tokens'] / args.streams:.0f} tokens each)", flush=True)  # fmt: skip
    return raw


def summarize(raw: dict) -> tuple[dict, str]:
    def tps(runs: list[dict]) -> float:
        return median([t for run in runs for t in run["stream_tps"]])

    summary = {
        server: {w: {"stream_tps": tps(kinds["constrained"]), "free_stream_tps": tps(kinds["free"]),
                     "tokens": median([run["tokens"] for run in kinds["constrained"]])}
                 for w, kinds in by_workload.items()}
        for server, by_workload in raw.items()
    }  # fmt: skip
    header = ["server", "workload", "per-stream tok/s", "free, same lengths", "tokens per run", "vs free",
              "gateway-llamacpp / llama-server"]  # fmt: skip
    rows = []
    for server, by_workload in summary.items():
        for workload, figures in by_workload.items():
            versus_peer = ""
            if server == "gateway-llamacpp" and "llama-server" in summary:
                versus_peer = f"{ratio(figures['stream_tps'], summary['llama-server'][workload]['stream_tps']):.2f}x"
            vs_free = ratio(figures["stream_tps"], figures["free_stream_tps"])
            rows.append([server, workload, figures["stream_tps"], figures["free_stream_tps"], figures["tokens"],
                         f"{vs_free:.2f}x", versus_peer])  # fmt: skip
    return summary, markdown_table(header, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--hf-model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1-hf")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary (scripts/build_llama_server.sh)")
    parser.add_argument("--engines", default="llamacpp,transformers", help="gateway engines, comma-separated")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=1024, help="context per stream (slot)")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--prompt-cache", action="store_true")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--name", default="bench_constrained")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    services = [gateway(engine, args) for engine in args.engines.split(",")]
    if args.llama_server:
        services.append(llama_server(args))
    log_dir = ROOT / "bench-results" / f"{args.name}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for service in services:
            service.start(log_dir, timeout=args.start_timeout)
        raw = measure(services, args)
    finally:
        stop_all(services)
    summary, table = summarize(raw)
    settings = {k: str(v) for k, v in vars(args).items()}
    write_result(args.name, {"machine": machine(), "settings": settings, "summary": summary, "raw": raw}, table)


if __name__ == "__main__":
    main()
