"""Model lifecycle: local models load on first use (or when pre-warmed) and unload when told, when idle, or
under memory pressure, as the governor (gateway/models/governor.py) decides; under pressure an embedding model or
reranker on a GPU moves to the governor's warm pool in host RAM instead, and back on its next request.

`ManagedModel` is itself an `Engine`: routes use it like any engine, and it loads the real one on demand,
counts the requests it serves (so it is never unloaded under one: each holds it from its first engine call
to its last, and prompt work left on a thread by a cancelled request holds it too) and builds a fresh engine
after each unload. `ModelManager` holds the models, makes room before a load, and sweeps idle ones in the
background.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from engines.base import (
    Delta,
    Embeddings,
    Engine,
    EngineInfo,
    EngineNotReady,
    Prompt,
    SamplingParams,
    Scores,
)
from engines.common import not_a_reranker
from gateway.models.governor import Eviction, InsufficientMemory, MemoryGovernor
from gateway.telemetry import metrics

log = logging.getLogger(__name__)


class ManagedModel:
    """One local model: unloaded → loading → ready → (unloading →) unloaded, or failed; from ready also
    offloading → offloaded (in the warm pool) → restoring → ready, or → unloading → unloaded."""

    def __init__(self, served_name: str, factory: Callable[[], Engine], estimate: int, manager: "ModelManager",
                 suggest: Callable[[int], str], prepare: Callable[[], Awaitable[object]] | None = None,
                 tool_format: str | None = None, kind: str = "chat"):  # fmt: skip
        self.served_name = served_name
        self.kind = kind  # "chat", "embedding" or "rerank": what /v1/models and /health call it
        self.tool_format = tool_format  # the target's `tool_parser` option: a tool-call format by name
        self.suggest = suggest  # what would fit in so many bytes, for a 507
        self._factory = factory
        self._engine = factory()
        self.name = self._engine.name
        self.estimate = estimate
        self._manager = manager
        self._prepare = prepare  # fetches the model file first, when it comes from a URL
        self.state = "unloaded"
        self.loaded_once = False
        self._error: str | None = None
        self._loading: asyncio.Task | None = None
        self._transition = asyncio.Lock()
        self._in_flight = 0
        self._last_used = time.monotonic()
        self._warm_bytes = 0  # what the weights take in the warm pool, while offloaded

    # ---- what the governor reads -----------------------------------------------------------

    def footprint(self) -> int:
        """Bytes on the budget's device (the GPU on CUDA): in a move the estimate, as both ends may hold it."""
        if self.state == "ready":
            return self._engine.info().memory_bytes
        return self.estimate if self.state in ("loading", "unloading", "offloading", "restoring") else 0

    def warm_bytes(self) -> int:
        return self._warm_bytes if self.state in ("offloaded", "restoring") else 0

    def evictable(self) -> bool:
        """Loaded or in the warm pool, held by no request, no load or restore under way, and no thread still
        reading the model: freeing it now is safe."""
        return (self.state in ("ready", "offloaded") and self._loading is None and self._in_flight == 0
                and self._engine.prompt_work() == 0)  # fmt: skip

    def location(self) -> str:
        """Where the weights are, for /health and /v1/models/{id}/load: "gpu" (or "cpu" on a CPU engine) while
        loaded, "cpu_warm" in the warm pool, else "unloaded"."""
        if self.state in ("offloaded", "restoring"):
            return "cpu_warm"
        if self.state in ("ready", "offloading", "unloading"):
            return "cpu" if self._engine.info().device == "cpu" else "gpu"
        return "unloaded"

    def idle_seconds(self) -> float:
        return time.monotonic() - self._last_used

    def last_used(self) -> float:
        return self._last_used

    def readiness(self) -> str:
        """For /ready: "ready" once loaded, even if since unloaded for idleness (it loads again on use), unless
        its engine is stalled."""
        if self._stalled(self._engine.info()):
            return "stalled"
        return "ready" if self.loaded_once and self.state != "failed" else self.state

    def _stalled(self, info: EngineInfo) -> bool:
        """Loaded, and inside one step for longer than any step should take: its requests wait in vain."""
        return self.state == "ready" and info.busy_s > self._manager.stall_after

    # ---- load and unload -------------------------------------------------------------------

    async def ensure_loaded(self) -> None:
        """Return once ready: start a load if needed and wait for it, at most the manager's load_wait."""
        self._last_used = time.monotonic()
        if self.state == "ready":
            return
        if self.state == "failed":
            raise EngineNotReady(f"model {self.served_name!r} failed to load: {self._error}")
        if self._loading is None:
            self._loading = asyncio.create_task(self._load())
        try:
            await asyncio.wait_for(asyncio.shield(self._loading), self._manager.load_wait)
        except TimeoutError:
            raise EngineNotReady(f"model {self.served_name!r} is loading; retry shortly") from None

    async def load(self) -> None:
        """Pre-warm. A model that failed is tried afresh: its file may have been put right since."""
        if self.state == "failed":
            await self._engine.close()
            self._engine, self.state, self._error = self._factory(), "unloaded", None
        await self.ensure_loaded()

    async def _load(self) -> None:
        try:
            async with self._transition:
                if self.state == "ready":
                    return
                warm = self.state == "offloaded"
                await self._manager.make_room(self)
                started = time.perf_counter()
                await (self._engine.restore() if warm else self._fresh_load())
                self.state, self.loaded_once = "ready", True
                # Idle from now, not from when the load began: a load longer than the idle timeout (vLLM
                # compiling on a small CPU) must not be undone by the next sweep.
                self._last_used = time.monotonic()
            if warm:
                metrics.record_restore(self.served_name)
            else:
                metrics.record_model_event(self.served_name, "load")
            what = "restored from the warm pool" if warm else "loaded"
            log.info("model %s %s in %.2fs", self.served_name, what, time.perf_counter() - started)
        except InsufficientMemory:
            raise  # no room now: it stays where it was (unloaded, or warm); a later request may find some
        except Exception as error:
            self.state, self._error = "failed", str(error)
            metrics.record_model_event(self.served_name, "load_failed")
            log.error("loading model %s failed: %s", self.served_name, error)
            raise EngineNotReady(f"model {self.served_name!r} failed to load: {error}") from error
        finally:
            self._loading = None

    async def _fresh_load(self) -> None:
        if self._prepare is not None:
            await self._prepare()
        await self._engine.load()

    async def offload(self, reason: str) -> bool:
        """Move the weights to the warm pool unless the model is serving (False then); where its engine cannot
        (llama.cpp, a CPU device), unload it instead. The next request moves it back, or loads it again."""
        async with self._transition:
            if self.state != "ready" or not self.evictable():
                return False
            self._warm_bytes = self.estimate = max(self.estimate, self._engine.info().memory_bytes)
            self.state = "offloading"
            try:
                moved = await self._engine.offload()
            except Exception:  # the weights may be half moved: unloading frees both halves
                log.exception("moving model %s to the warm pool failed; unloading it", self.served_name)
                moved = False
            self.state = "offloaded" if moved else "ready"
        if not moved:
            return await self.unload(reason)
        metrics.record_offload(self.served_name, reason)
        log.info("model %s moved to the warm pool (%s)", self.served_name, reason)
        return True

    async def unload(self, reason: str) -> bool:
        """Unload, from the GPU or the warm pool, unless the model is serving (False then). The next request
        loads it again."""
        async with self._transition:
            if not self.evictable():
                return False
            self.state = "unloading"
            # The real footprint is a better estimate for the next load than the registry's weights-only one.
            self.estimate = max(self.estimate, self._engine.info().memory_bytes)
            await self._engine.close()
            self._engine = self._factory()
            self.state = "unloaded"
        metrics.record_model_event(self.served_name, f"unload_{reason}")
        log.info("model %s unloaded (%s)", self.served_name, reason)
        return True

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            with contextlib.suppress(BaseException):
                await self._loading
        await self._engine.close()

    # ---- the Engine interface: load on demand, count what is being served -------------------

    def info(self) -> EngineInfo:
        info = self._engine.info()
        state = "stalled" if self._stalled(info) else self.state
        return dataclasses.replace(info, model=self.served_name, state=state, error=self._error)

    def context_length(self) -> int:
        return self._engine.context_length()

    async def chat_template(self) -> str | None:
        await self.ensure_loaded()
        return await self._engine.chat_template()

    async def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        template_args: dict[str, Any] | None = None, add_generation_prompt: bool = True,
    ) -> Prompt:  # fmt: skip
        await self.ensure_loaded()
        return await self._engine.render_chat(messages, tools, template_args, add_generation_prompt)

    async def encode_prompt(self, prompt: str | list[int], add_special: bool = True) -> Prompt:
        await self.ensure_loaded()
        return await self._engine.encode_prompt(prompt, add_special)

    async def decode(self, sequences: list[list[int]]) -> list[str]:
        await self.ensure_loaded()
        return await self._engine.decode(sequences)

    def prompt_work(self) -> int:
        return self._engine.prompt_work()

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        with self.serving():
            await self.ensure_loaded()
            async with contextlib.aclosing(self._engine.generate(prompt, params)) as deltas:
                async for delta in deltas:
                    yield delta

    async def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        with self.serving():
            await self.ensure_loaded()
            return await self._engine.embed(inputs)

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        if self.kind != "rerank":  # refused before a load: a chat model is not loaded only to say no
            raise not_a_reranker(self.served_name)
        with self.serving():
            await self.ensure_loaded()
            return await self._engine.rerank(query, documents)

    @contextlib.contextmanager
    def serving(self):
        """Holds the model for a request: not unloaded (by a request, the idle sweep or the governor) until
        released. A generation holds it from its start until its stream is closed (by its reader, or by the
        garbage collector)."""
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._last_used = time.monotonic()


class ModelManager:
    """The local models by public name, the governor's budget over them, and the idle sweeper."""

    def __init__(self, governor: MemoryGovernor, unload_after: float, load_wait: float, stall_after: float):
        self.governor = governor
        self.unload_after = unload_after  # seconds idle before unloading; 0: never
        self.load_wait = load_wait  # seconds a request waits for a load before 503
        self.stall_after = stall_after  # seconds one engine step may run before the model counts as stalled
        self.models: dict[str, ManagedModel] = {}
        self._room = asyncio.Lock()

    def add(self, model: ManagedModel) -> None:
        self.models[model.served_name] = model

    def get(self, name: str) -> ManagedModel | None:
        return self.models.get(name)

    def state(self) -> dict:
        return self.governor.state(list(self.models.values()))

    async def make_room(self, model: ManagedModel) -> None:
        """Free least recently used idle models until `model`'s estimate fits; 507 if it cannot."""
        async with self._room:
            others = [m for m in self.models.values() if m is not model]
            for eviction in self.governor.victims_for(model.estimate, others, model.suggest):
                await _free(eviction)
            # counts with its estimate from here on
            model.state = "restoring" if model.state == "offloaded" else "loading"

    async def sweep(self) -> None:
        """Free what idles too long; under the same lock as `make_room`, so the two never plan on stale figures."""
        async with self._room:
            for eviction in self.governor.idle_victims(list(self.models.values()), self.unload_after):
                await _free(eviction)

    async def run_sweeper(self) -> None:
        """Every second (or a quarter of a short idle timeout), unload what idles too long."""
        interval = min(1.0, self.unload_after / 4) if self.unload_after > 0 else 1.0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("the idle sweep failed")

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.models.values()))


async def _free(eviction: Eviction) -> None:
    model = eviction.model
    await (model.offload(eviction.reason) if eviction.offload else model.unload(eviction.reason))
