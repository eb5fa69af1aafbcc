"""Bookkeeping every in-process engine does alike: its state through load and close, the ready check, `info()`.

`engines.base.Engine` stays the interface the gateway calls; `BaseEngine` only spares each engine writing
the same state handling again. An engine keeps what is its own: loading its model, serving requests, and
the figures `info()` reports (the hooks at the end).
"""

from __future__ import annotations

import asyncio
import functools
import os
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, TypeVar

from engines.base import ContextLengthExceeded, EngineConfig, EngineInfo, EngineNotReady, Scores, UnsupportedFeature

Runner = TypeVar("Runner")  # what serves an engine's requests: a scheduler, a worker, an AsyncLLM

# What a model loaded with each `options.task` serves ("generate", a chat model, where it names none): it refuses
# the other endpoints, except that a chat model may also embed.
TASKS = {
    "generate": ("a chat model", "/v1/chat/completions"),
    "embed": ("an embedding model", "/v1/embeddings"),
    "rerank": ("a reranker", "/v1/rerank"),
}


def model_task(config: EngineConfig) -> str:
    """The target's `options.task`; a configuration mistake stops start-up."""
    task = config.options.get("task") or "generate"
    if task not in TASKS:
        raise ValueError(f"options.task {task!r} is not a task the engines know (embed, rerank, or none for chat)")
    return task


def require_task(config: EngineConfig, task: str, asked: str, chat_embeds: bool = True) -> None:
    """Refuses, 400 naming `model`, a request for `asked` to a model loaded for `task` (a chat model also embeds
    where the engine can)."""
    if asked != task and not (chat_embeds and asked == "embed" and task == "generate"):
        kind, endpoint = TASKS[task]
        raise UnsupportedFeature(f"model {config.served_name!r} is {kind}; use {endpoint}", param="model")


def not_a_reranker(model: str) -> UnsupportedFeature:
    return UnsupportedFeature(
        f"model {model!r} is not a reranker; /v1/rerank needs a model served with `options: {{task: rerank}}`",
        param="model",
    )


def pair_too_long(window: int, index: int, tokens: int) -> ContextLengthExceeded:
    """For a (query, document) pair longer than a reranker's window: refused as vLLM's /rerank refuses it (it
    truncates only when a request asks)."""
    return ContextLengthExceeded(
        f"This model's maximum context length is {window} tokens. However, the query with document {index} takes "
        f"{tokens} tokens. Please reduce the length of the documents or the query.", param="documents",
    )  # fmt: skip


class BaseEngine(ABC, Generic[Runner]):
    """State: "loading", then "ready" once `load()` succeeds or "failed" with its error.

    Each engine's own `close()` frees what it loaded and ends with the state "closed".
    """

    name: str
    chat_embeds = True  # whether a chat model also serves /v1/embeddings

    def __init__(self, config: EngineConfig):
        self.config = config
        self._task = model_task(config)  # what the model serves: a configuration mistake stops start-up here
        self._state = "loading"
        self._error: str | None = None
        self._prompt_threads: ThreadPoolExecutor | None = None
        self._prompt_work: set[Future] = set()  # queued or running on the prompt threads, until its thread is done

    async def load(self) -> None:
        try:
            await asyncio.to_thread(self._load_blocking)
        except Exception as exc:
            # Kept for info(): the gateway reports why a model is not serving.
            self._state, self._error = "failed", str(exc)
            raise
        self._start()
        # One thread per core: a burst of long prompts cannot start more tokenizations than there are cores.
        self._prompt_threads = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix=f"{self.name}-prompts")
        self._state = "ready"

    def _off_loop(self, work: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
        """Blocking work that reads the model (rendering a chat, tokenizing) on the prompt threads. It counts in
        `prompt_work()` until its thread returns, also after the request awaiting it was cancelled: the model
        must stay loaded until then. Work cancelled before its thread took it never runs."""
        future = self._prompt_threads.submit(functools.partial(work, *args, **kwargs))
        self._prompt_work.add(future)
        future.add_done_callback(self._prompt_work.discard)  # set.discard is atomic: safe from the thread
        return asyncio.wrap_future(future)

    def prompt_work(self) -> int:
        """Prompt work queued or running on threads, for requests live or already cancelled."""
        return len(self._prompt_work)

    async def _end_prompt_work(self) -> None:
        """Before the model is freed: wait for the prompt threads still reading it."""
        if self._prompt_threads is not None:
            await asyncio.to_thread(self._prompt_threads.shutdown, wait=True)
            self._prompt_threads = None

    async def offload(self) -> bool:
        """Keeping the weights in host RAM for a fast `restore`: not by default (the model is unloaded instead)."""
        return False

    async def restore(self) -> None:
        """Only called after an `offload` that returned True, by an engine that overrides both."""
        raise NotImplementedError(f"the {self.name} engine cannot restore offloaded weights")

    @abstractmethod
    def _load_blocking(self) -> None:
        """Load the model; runs on a thread, as it blocks for seconds or minutes."""

    def _start(self) -> None:
        """Build the runner once the model is loaded, on the event loop (worker threads report to it).

        Nothing by default, for an engine whose load builds its runner."""

    @abstractmethod
    def _runner(self) -> Runner | None:
        """What serves requests; None before the load and after close."""

    def _require_ready(self, task: str = "generate") -> Runner:
        """The runner, for a request of `task` that this model serves."""
        runner = self._runner()
        if self._state != "ready" or runner is None:
            raise EngineNotReady(f"model {self.config.served_name!r} is {self._state}")
        require_task(self.config, self._task, task, self.chat_embeds)
        return runner

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        """Only a reranker (a model loaded with `options.task: rerank`) scores pairs: the engines that load rerankers
        override this, and call it for their other models."""
        raise not_a_reranker(self.config.served_name)

    def info(self) -> EngineInfo:
        running, waiting = self._queue_lengths()
        return EngineInfo(
            engine=self.name,
            model=self.config.served_name,
            device=self._device_type(),
            state=self._state,
            context_length=self.context_length(),
            embedding_dimensions=self._embedding_dimensions(),
            memory_bytes=self._memory_bytes(),
            running=running,
            waiting=waiting,
            error=self._error,
            busy_s=self._busy_seconds(),
        )

    # ---- info() hooks ----------------------------------------------------------------------

    @abstractmethod
    def _device_type(self) -> str: ...

    @abstractmethod
    def _memory_bytes(self) -> int:
        """What the model holds in memory; 0 while none is loaded."""

    @abstractmethod
    def _embedding_dimensions(self) -> int | None: ...

    def context_length(self) -> int:
        """Tokens a request may use."""
        return self.config.context_length

    def _queue_lengths(self) -> tuple[int, int]:
        """Requests running and waiting, by default as a `WorkerThread` runner counts them."""
        runner = self._runner()
        return (runner.running, runner.waiting) if runner is not None else (0, 0)

    def _busy_seconds(self) -> float:
        """How long the current step has run, by default as a `WorkerThread` runner measures it."""
        runner = self._runner()
        return runner.busy_seconds if runner is not None else 0.0
