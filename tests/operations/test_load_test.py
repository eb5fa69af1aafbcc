"""scripts/load_test.py against a running gateway: every streamed request succeeds, and the report's
token count is what the gateway itself counted in /metrics."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import MODEL, ROOT, start_server


def test_load_test_finishes_with_zero_errors(tmp_path):
    server = start_server(tmp_path)
    try:
        result = subprocess.run(
            [sys.executable, "scripts/load_test.py", "--url", server.v1, "--requests", "12", "--concurrency", "4",
             "--max-tokens", "8", "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["requests"] == 12 and report["errors"] == 0
        assert report["requests_per_second"] > 0 and report["tokens_per_second"] > 0
        assert report["latency_seconds"]["p99"] >= report["latency_seconds"]["p50"] >= report["ttft_seconds"]["p50"]
        assert "requests" in result.stderr  # the progress bar
        metrics = server.get("/metrics").text
        line = f'llm_completion_tokens_total{{model="{MODEL}",target="local"}} {float(report["completion_tokens"])}'
        assert line in metrics
    finally:
        server.stop()


def test_load_test_counts_errors(server):
    result = subprocess.run(
        [sys.executable, "scripts/load_test.py", "--url", server.v1, "--model", "no-such-model",
         "--requests", "3", "--json", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["errors"] == 3 and "HTTP 404" in report["first_errors"][0]
