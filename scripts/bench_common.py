"""What every benchmark script shares: starting servers as subprocesses, statistics, and writing the
JSON result plus the Markdown table that docs/benchmarks.md quotes."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench-results"


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return listener.getsockname()[1]


@dataclass
class Service:
    """A server under test: a command line and the URL that answers 200 once it is ready."""

    name: str
    command: list[str]
    ready_path: str
    ready_text: str = ""  # must appear in the ready answer (the gateway answers 200 while loading)
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout: float = 300) -> "Service":
        log_path = log_dir / f"{self.name}.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env={**os.environ, **self.env}, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {log_path}")
            answer = _answer(self.base_url + self.ready_path)
            if answer is not None and self.ready_text in answer:
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _answer(url: str) -> str | None:
    """The body of a 200 answer, else None."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode(errors="replace") if response.status == 200 else None
    except OSError:
        return None


def exit_on_sigterm() -> None:
    """A terminated benchmark still runs its `finally` blocks, so no server it started is left behind."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def stop_all(services: list[Service]) -> None:
    for service in services:
        service.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, result: dict, table: str, out_dir: Path = RESULTS_DIR) -> None:
    """`bench-results/<name>.json` holds every figure; `<name>.md` the table with its date, machine and command."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    info = result["machine"]
    heading = (
        f"{info['date']}, {info['cpu']} ({info['cores']} cores, {info['memory_gib']} GiB), "
        f"command: `{info['command']}`"
    )
    (out_dir / f"{name}.md").write_text(f"{heading}\n\n{table}\n")
    print(f"\n{heading}\n\n{table}\n\n(results in {out_dir / name}.json)")
