"""The plumbing between the event loop and a thread that owns a model: sequences and jobs go in through a
thread-safe inbox, results come back to each sequence's asyncio queue in one loop callback per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from engines.base import Delta, EngineError, EngineNotReady, EngineOverloaded, GenerationFailed, UnsupportedFeature

INTAKE_HOLD_S = 0.005  # the longest a hand-over waits for prompts still being tokenized


class WorkerThread:
    """Subclasses implement `_run` (the thread's loop) and keep their running sequences in `_running`."""

    def __init__(self, name: str, capacity: int, *, gather_for: float | None = None):
        """`gather_for`: how long the first request reaching an idle worker waits for the rest of its burst, so
        that their prompts share the first step; 0 waits two event-loop iterations, None hands every request over
        at once."""
        self._capacity = capacity  # running plus waiting sequences; beyond it, 503
        self._gather_for = gather_for
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque = deque()
        self._running: list = []
        self._outbox: list[tuple[asyncio.Queue, Any]] = []
        self._arriving: list = []  # submitted on the event loop, not yet handed to the worker
        self._intakes = 0  # prompts being tokenized off the event loop, for requests about to submit
        self._held_since: float | None = None  # when a hand-over began to wait for them
        self._submitted = 0  # written by the event loop only
        self._admitted = 0  # written by the worker only
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._busy_since: float | None = None  # when the step or job now running began (written by the worker)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    # ---- event-loop side -------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return self._submitted - self._admitted

    @property
    def busy_seconds(self) -> float:
        """How long the step or job now running has run; 0 between them. A step that never returns (a GPU
        hang) shows here, where nothing else would: its requests only time out."""
        since = self._busy_since
        return time.monotonic() - since if since is not None else 0.0

    def _enqueue(self, sequence) -> None:
        if self.running + self.waiting >= self._capacity:
            raise EngineOverloaded(
                f"the {self._thread.name} is full: {self.running} requests running, {self.waiting} waiting"
            )
        idle = self.running == 0 and self.waiting == 0
        self._submitted += 1
        if self._gather_for is None:
            self._post(sequence)
            return
        self._arriving.append(sequence)
        if len(self._arriving) > 1:
            return
        # The requests of a burst reach the worker together and their prompts share its next step, instead of
        # the first prompt taking a whole step alone while the others wait for it. Two loop iterations catch
        # those read in the same poll as this one and in the next (with uvloop; each runs through to its
        # submit in between); a busy worker gathers later arrivals during its step anyway.
        if idle and self._gather_for > 0:
            self._loop.call_later(self._gather_for, self._hand_over)
        else:
            self._hand_over_soon()

    def _hand_over_soon(self) -> None:
        """Two loop iterations from now (see `_enqueue`)."""
        self._loop.call_soon(self._loop.call_soon, self._hand_over)

    @contextlib.contextmanager
    def intake(self):
        """Around tokenizing a prompt off the event loop. A burst's prompts are tokenized side by side on other
        threads and finish in different loop iterations; the hand-over waits for them (up to INTAKE_HOLD_S), so
        they still share the next step."""
        self._intakes += 1
        try:
            yield
        finally:
            self._intakes -= 1
            if self._intakes == 0 and self._held_since is not None:
                self._hand_over_soon()

    def _hand_over(self) -> None:
        if self._intakes and self._arriving:
            now = self._loop.time()
            if self._held_since is None:
                self._held_since = now
                self._loop.call_later(INTAKE_HOLD_S, self._hand_over)
            if now - self._held_since < INTAKE_HOLD_S:
                return
        self._held_since = None
        arriving, self._arriving = self._arriving, []
        for sequence in arriving:
            if self._stopping:  # the worker has gone: nothing else would answer this sequence
                sequence.inbox.put_nowait(shutting_down())
            else:
                self._post(sequence)

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run `fn` on the worker thread between steps (embeddings use the model too)."""
        future: Future = Future()
        self._post((fn, future))
        return asyncio.wrap_future(future)

    async def call_each(self, fn: Callable[[Any], Any], items: list) -> list:
        """`fn(item)` for every item, one job at a time, so the running sequences' steps go on in between: as
        one job, a large embedding input would hold every stream until it was done."""
        return [await self.call(functools.partial(fn, item)) for item in items]

    def wake(self) -> None:
        self._post(None)

    def _post(self, item: Any) -> None:
        """Into the worker's inbox: a sequence, a job, or None to wake it."""
        self._inbox.put(item)

    def _deliver(self, items: list[tuple[asyncio.Queue, Any]]) -> None:
        """On the event loop: what a step sent, each item into its sequence's queue."""
        for inbox, item in items:
            inbox.put_nowait(item)

    def stop(self) -> None:
        self._stopping = True
        self.wake()
        self._thread.join(timeout=30)

    # ---- worker side -----------------------------------------------------------------------

    def _take_inbox(self, block: bool) -> bool:
        """New sequences join the waiting line; jobs run now, between steps. Returns whether anything came in (a
        cancellation always does: `deltas` wakes the worker after it)."""
        if not block and self._inbox.empty():  # most steps: no get_nowait raising queue.Empty
            return False
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if isinstance(item, tuple):
                self._timed(_run_job, *item)
            elif item is not None:
                self._waiting.append(item)
        return True

    def _timed(self, work: Callable[..., Any], *args) -> Any:
        """Runs a step or job, for `busy_seconds`. A plain call: a context manager costs noticeably per step,
        right after a decode."""
        self._busy_since = time.monotonic()
        try:
            return work(*args)
        finally:
            self._busy_since = None

    def _send(self, sequence, item: Any) -> None:
        self._outbox.append((sequence.inbox, item))

    def _flush_outbox(self) -> None:
        if self._outbox:
            items, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(self._deliver, items)


def shutting_down() -> EngineNotReady:
    """What a sequence the worker will not finish hears as the engine closes: a 503, as for a model not ready."""
    return EngineNotReady("the engine is shutting down")


class JobThread(WorkerThread):
    """A thread that runs jobs only (`call`), one at a time: for a model that serves no sequences (a reranker)."""

    def __init__(self, name: str):
        super().__init__(name, capacity=0)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self._take_inbox(block=True)


async def deltas(sequence, worker: WorkerThread) -> AsyncIterator[Delta]:
    """A sequence's deltas as they arrive; closing early cancels it in the worker."""
    ended = False  # the worker has let the sequence go: it sent the last delta or an error
    try:
        while True:
            item = await sequence.inbox.get()
            ended = isinstance(item, BaseException) or bool(item.finish_reason)
            if isinstance(item, EngineError):  # the worker said whose fault it is
                raise item
            if isinstance(item, ValueError):  # what a worker says of settings it cannot run (a bad grammar)
                raise UnsupportedFeature(str(item), param="response_format")
            if isinstance(item, BaseException):
                raise GenerationFailed(f"generation failed: {item}")
            yield item
            if ended:
                return
    finally:
        # Only a sequence left unfinished needs the worker: waking it for one that ended cost the event loop a
        # cross-thread wake-up per request.
        if not ended and not sequence.cancelled:
            sequence.cancel()
            worker.wake()


def _run_job(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
