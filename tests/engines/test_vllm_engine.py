"""vLLM-only facts: the gateway stopped while vLLM is still loading leaves no process behind."""

from __future__ import annotations

import contextlib
import signal

import psutil
import pytest

from tests.conftest import ENGINES, STARTUP_SECONDS, require, start_server, wait_for

VLLM = ENGINES["vllm"]


def engine_core(gateway: psutil.Process) -> psutil.Process | None:
    """vLLM's engine-core child, once spawned (vLLM titles it VLLM::EngineCore)."""
    for child in gateway.children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def wait_for_engine_core(gateway: psutil.Process) -> None:
    def spawned() -> psutil.Process | None:
        assert gateway.is_running(), "the gateway exited before vLLM started its engine"
        return engine_core(gateway)

    wait_for(spawned, STARTUP_SECONDS, "no vLLM engine process", interval=0.2)


# SIGTERM to the gateway alone is how systemd, Docker or `kill` stop it; Ctrl-C sends SIGINT to the whole
# foreground process group, the engine processes included.
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_stopping_while_vllm_loads_leaves_no_process(tmp_path, ctrl_c):
    require(VLLM)
    server = start_server(tmp_path, wait_ready=False, engine=VLLM)
    gateway = psutil.Process(server.process.pid)
    tree = [gateway]
    try:
        wait_for_engine_core(gateway)
        tree += gateway.children(recursive=True)
        assert server.health()["status"] == "loading"  # so the signal below lands mid-load
        for process in tree if ctrl_c else [gateway]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGINT if ctrl_c else signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, f"still running a minute after the signal: {alive}\n{server.log()}"
        # vLLM logs this once it has built an engine: the loads were cut short, not waited out.
        assert "init engine" not in server.log()
    finally:
        for process in tree:  # nothing outlives a failed test either
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
