"""Profiles servers under a steady streaming load (what `bench_vllm.py --profile-seconds` runs once the
benchmark's repetitions are over, with the servers still up).

For each server (its process and every descendant, e.g. vLLM's engine core):
- CPU windows, the servers in turn, `rounds` times: per-thread CPU seconds from /proc/PID/task/TID/stat
  over a window of `seconds` of N streams restarted as they end, with the tokens (`usage`) generated in it;
- one py-spy window: `py-spy record --subprocesses --threads --format raw` (collapsed stacks) during the
  same load, then a few `py-spy dump --native` snapshots under load.
Writes profile.json and the py-spy files to `out_dir`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
from bench_streams import one_stream

TICK = os.sysconf("SC_CLK_TCK")


def family(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """'pid:command/tid:thread-name' -> CPU seconds (user + system) so far."""
    result = {}
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60].strip()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            result[f"{pid}:{command}/{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / TICK
    return result


async def steady_load(url: str, body: dict, streams: int, seconds: float) -> dict:
    """`streams` streams, each restarted as it ends, for `seconds`; the tokens the servers reported."""
    deadline = time.monotonic() + seconds
    tokens = requests = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, requests
        while time.monotonic() < deadline:
            stream = await one_stream(session, url, body)  # awaited first: `tokens += await ...` would race
            tokens += stream.tokens
            requests += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(streams)))
    wall = time.monotonic() - started
    return {"tokens": tokens, "requests": requests, "seconds": wall, "tps": tokens / wall}


def cpu_window(service, body: dict, streams: int, seconds: float) -> dict:
    pids = family(service.process.pid)
    before = thread_cpu(pids)
    load = asyncio.run(steady_load(service.base_url + "/v1/completions", body, streams, seconds))
    after = thread_cpu(pids)
    used = {key: after[key] - before.get(key, 0.0) for key in after}
    busy = {key: round(value, 3) for key, value in sorted(used.items(), key=lambda kv: -kv[1]) if value > 0}
    per_token_us = {key: round(value / load["tokens"] * 1e6, 2) for key, value in busy.items()}
    return {"load": load, "cpu_s": busy, "cpu_us_per_token": per_token_us}


def pyspy_window(service, body: dict, streams: int, seconds: float, out_dir: Path, py_spy: str) -> dict:
    pid = service.process.pid
    raw = out_dir / f"{service.name}.pyspy.txt"
    record = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--subprocesses", "--threads", "--format", "raw", "--rate", "200",
         "--nonblocking", "--duration", str(int(seconds)), "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.0)  # py-spy attached

    async def load_and_dump() -> dict:
        task = asyncio.create_task(steady_load(service.base_url + "/v1/completions", body, streams, seconds))
        await asyncio.sleep(seconds / 2)
        dumps = []
        for _ in range(3):
            dump = await asyncio.create_subprocess_exec(
                py_spy, "dump", "--pid", str(pid), "--subprocesses", "--native",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            dumps.append((await dump.communicate())[0].decode(errors="replace"))
            await asyncio.sleep(0.3)
        (out_dir / f"{service.name}.dump.txt").write_text("\n\n======\n\n".join(dumps))
        return await task

    load = asyncio.run(load_and_dump())
    _, errors = record.communicate(timeout=120)
    return {"load": load, "py_spy_stderr": errors.decode(errors="replace")[-2000:]}


def profile(services, body_of, args, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    streams, seconds = args.profile_streams, args.profile_seconds
    result: dict = {"streams": streams, "seconds": seconds, "cpu_windows": [], "py_spy": {}}
    for round_ in range(args.profile_rounds):
        order = services[round_ % len(services) :] + services[: round_ % len(services)]
        for service in order:
            measured = cpu_window(service, body_of(service.name), streams, seconds)
            window = {"service": service.name, "round": round_ + 1, **measured}
            result["cpu_windows"].append(window)
            top = list(window["cpu_us_per_token"].items())[:3]
            tps = window["load"]["tps"]
            print(f"cpu round {round_ + 1} {service.name:<11} {tps:7.1f} tok/s  top us/token {top}", flush=True)
    py_spy = shutil.which("py-spy") or "/tmp/site/bin/py-spy"
    if Path(py_spy).exists():
        for service in services:
            window = pyspy_window(service, body_of(service.name), streams, seconds, out_dir, py_spy)
            result["py_spy"][service.name] = window
            print(f"py-spy {service.name}: {window['load']['tps']:.1f} tok/s", flush=True)
    else:
        print("py-spy not found: no stack profiles")
    (out_dir / "profile.json").write_text(json.dumps(result, indent=2))
