"""Benchmark 3: what the gateway adds when it only relays. nginx answers every chat completion with a
fixed JSON body (no model); wrk drives it directly, through the gateway (a remote `openai` target), through
a bare FastAPI + aiohttp relay (scripts/bare_relay.py: the floor for a relay in Python), and through the
LiteLLM proxy, at several concurrencies, alternating, several repetitions. Added latency is the relay's
p50/p99 minus the direct p50/p99 of the same repetition.

Needs nginx and wrk on PATH (Debian packages) and LiteLLM's proxy in its own virtualenv (--litellm,
the `litellm` executable; the Makefile's `bench-overhead` target makes one).

--redis measures what shared state costs: a second gateway, `gateway-redis`, keeps it in a redis-server started here
(Debian's; LLM_REDIS_URL), and both gateways check an API key with rate limits that never refuse, so every request
runs the limit scripts (admission with its token hold, and the settle) and the target's cooldown read. Compare its
added p50 with `gateway`'s.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    Service,
    exit_on_sigterm,
    free_port,
    machine,
    markdown_table,
    median,
    stop_all,
    write_result,
)

REPLY = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "fixed",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}  # fmt: skip
REQUEST = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
BENCH_KEY = "sk-bench-overhead"
# With --redis: a key whose limits never refuse, so each request is counted (the gateway with Redis: in Redis).
LIMITED_KEY = {"LLM_API_KEYS": BENCH_KEY, "LLM_RATE_LIMIT_RPM": str(10**9), "LLM_RATE_LIMIT_TPM": str(10**12)}


def nginx(work: Path) -> Service:
    service = Service("direct", [], "/health")
    conf = work / "nginx.conf"
    body = json.dumps(REPLY).replace("'", "\\'")
    conf.write_text(
        f"worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx-error.log;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; client_body_temp_path {work}; server {{ listen 127.0.0.1:{service.port};\n"
        "  location /health { return 200 'ok'; }\n"
        f"  location / {{ default_type application/json; return 200 '{body}'; }} }} }}\n"
    )
    service.command = ["nginx", "-c", str(conf), "-p", str(work), "-g", "daemon off;"]
    return service


def gateway(work: Path, upstream: Service, name: str = "gateway", env: dict[str, str] | None = None) -> Service:
    config = work / "gateway.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "targets": {"upstream": {"type": "openai", "base_url": upstream.base_url + "/v1", "model": "fixed"}},
        "models": {"bench": {"targets": ["upstream"]}},
    }))  # fmt: skip
    service = Service(name, [sys.executable, "-m", "gateway", "serve"], "/health", '"status":"ok"')
    service.env = {"LLM_CONFIG": str(config), "LLM_PORT": str(service.port), "LLM_LOG_LEVEL": "warning", **(env or {})}
    return service


def redis_server(work: Path) -> tuple[subprocess.Popen, str]:
    """Debian's redis-server on a free loopback port, keeping nothing on disk; its URL once it answers."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(work)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("redis-server did not answer within 10 s")


def bare_relay(upstream: Service) -> Service:
    service = Service("bare-relay", [], "/health")
    script = Path(__file__).resolve().parent / "bare_relay.py"
    service.command = [sys.executable, str(script), upstream.base_url + "/v1/chat/completions", str(service.port)]
    return service


def litellm(work: Path, upstream: Service, executable: str) -> Service:
    config = work / "litellm.yaml"
    config.write_text(json.dumps({"model_list": [{"model_name": "bench", "litellm_params": {
        "model": "openai/fixed", "api_base": upstream.base_url + "/v1", "api_key": "none"}}]}))  # fmt: skip
    service = Service("litellm", [], "/health/liveliness")
    service.command = [executable, "--config", str(config), "--host", "127.0.0.1", "--port", str(service.port),
                       "--num_workers", "1"]  # fmt: skip
    service.env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                   "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}  # fmt: skip
    return service


def warm_up(service: Service, headers: dict[str, str]) -> None:
    """One request first: LiteLLM imports and builds much of itself on its first call."""
    request = urllib.request.Request(service.base_url + "/v1/chat/completions", json.dumps(REQUEST).encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def wrk(url: str, concurrency: int, seconds: int, script: Path) -> dict:
    threads = 1 if concurrency == 1 else 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _latency(out, "50"),
        "p99_ms": _latency(out, "99"),
        "errors": "Non-2xx" in out or "Socket errors" in out,
    }


def _latency(out: str, pct: str) -> float:
    found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)$", out, re.M)
    if found is None:  # wrk prints no distribution when too few requests completed
        return float("nan")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def summarize(raw: dict) -> list[list]:
    rows = []
    for concurrency, runs in raw.items():
        direct = {k: median([r["direct"][k] for r in runs]) for k in ("rps", "p50_ms", "p99_ms")}
        for name in runs[0]:
            figures = {k: median([r[name][k] for r in runs]) for k in ("rps", "p50_ms", "p99_ms")}
            added = "" if name == "direct" else f"{figures['p50_ms'] - direct['p50_ms']:.2f}"
            added99 = "" if name == "direct" else f"{figures['p99_ms'] - direct['p99_ms']:.2f}"
            rows.append([concurrency, name, figures["rps"], figures["p50_ms"], figures["p99_ms"], added, added99])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--litellm", help="the litellm executable of its own virtualenv (omit to skip it)")
    parser.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--redis", action="store_true", help="add a gateway with its state in Redis (see above)")
    args = parser.parse_args()
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    script = work / "post.lua"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {BENCH_KEY}"} if args.redis else {})}
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = [[{json.dumps(REQUEST)}]]\n'
        + "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in headers.items())
    )
    upstream = nginx(work)
    state, url = redis_server(work) if args.redis else (None, None)
    keyed = LIMITED_KEY if args.redis else {}
    services = [upstream, gateway(work, upstream, env=keyed), bare_relay(upstream)]
    services += [gateway(work, upstream, "gateway-redis", {**keyed, "LLM_REDIS_URL": url})] if args.redis else []
    services += [litellm(work, upstream, args.litellm)] if args.litellm else []
    raw: dict = {c: [] for c in args.concurrency}
    try:
        for service in services:
            service.start(work)
            warm_up(service, headers)
        for rep in range(args.reps):
            for concurrency in args.concurrency:
                run = {}
                for service in services[rep % len(services) :] + services[: rep % len(services)]:
                    url = service.base_url + "/v1/chat/completions"
                    run[service.name] = wrk(url, concurrency, args.seconds, script)
                    print(f"rep {rep + 1} c={concurrency:>2} {service.name:<10} {run[service.name]}", flush=True)
                raw[concurrency].append({s.name: run[s.name] for s in services})
    finally:
        stop_all(services)
        if state is not None:
            state.kill()
    header = ["connections", "server", "requests/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"]
    table = markdown_table(header, summarize(raw))
    write_result("bench_overhead", {"machine": machine(), "settings": vars(args), "raw": raw}, table)


if __name__ == "__main__":
    main()
