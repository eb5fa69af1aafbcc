"""Continuous batching for llama.cpp: one worker thread owns the context and decodes every running
sequence in one `llama_decode` per step.

Each step puts one token for every decoding sequence into the batch, then fills what is left of
`batch_size` with prompt chunks of newly admitted sequences, so a long prompt never stalls running
streams. Sequences join and leave between steps; a cancelled one frees its slot at the next step.
While every running sequence decodes a token a step, the steps run in C (steps.c) without the GIL.
Sampled tokens reach the event loop through a ring (steps.py), and the loop turns them into text and
`Delta`s; it never calls into llama.cpp here.

A finished sequence leaves its KV cache in its slot (prefix reuse): a new prompt goes to the free slot
that already holds the longest start of it, and only the rest is decoded, so a shared system prompt or
a growing conversation is not computed again.
"""

from __future__ import annotations

import asyncio
import codecs
import heapq
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import llama_cpp
import numpy as np

from engines.base import Delta, SamplingParams, TokenLogprob
from engines.json_budget import BudgetWatch
from engines.llamacpp.native import (
    Batch,
    Vocab,
    build_sampling,
    exact_grammar,
    log_softmax,
    output_logits,
    text_tokens,
)
from engines.llamacpp.steps import (
    COUNT,
    DECODING,
    EMIT,
    FINISHED,
    FINISHED_EOG,
    FINISHED_LENGTH,
    FLAGS,
    LEFT,
    NO_WATCH,
    POS,
    RUN_FINISHED,
    RUN_INTERRUPTED,
    RUN_RING_FULL,
    RUN_TIMED_OUT,
    STOP_AT_EOG,
    WATCH,
    SlotSampling,
    Steps,
)
from engines.text import StopMatcher
from engines.worker_thread import WorkerThread, shutting_down

log = logging.getLogger(__name__)


MIN_PREFIX_REUSE = 16  # shorter shared starts do not justify leaving the lowest free slot
RUN_STATUSES = frozenset({RUN_INTERRUPTED, RUN_FINISHED, RUN_RING_FULL, RUN_TIMED_OUT})
RING_WAIT_S = 0.001  # how long the engine's thread waits for the event loop to read a full ring


@dataclass(eq=False)
class Sequence:
    tokens: list[int]
    params: SamplingParams
    grammar: str | None
    inbox: asyncio.Queue
    tag: int  # names its sampled tokens in the ring
    shown: frozenset[int] = frozenset()  # control tokens its text shows (tool-call markers); others are hidden
    watch: BudgetWatch | None = None  # a constrained JSON answer's token budget (the engine's thread's)
    watched: int = 0  # its tokens the watch has read
    slot: int = -1
    n_cached: int = 0
    reused: int = 0  # prompt tokens whose KV cache was already in the slot
    decoding: bool = False  # its prompt is in the KV cache: one token a step from now on
    sampling: SlotSampling | None = None
    cancelled: bool = False
    logprobs: deque = field(default_factory=deque)  # the engine's thread's, for the event loop, token by token
    # The event loop's: the text so far.
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    stops: StopMatcher | None = None
    sent: int = 0  # tokens turned into deltas

    @property
    def native(self) -> bool:
        """Its tokens go from C straight into the ring; with logprobs, Python adds them first."""
        return self.params.logprobs is None

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler(WorkerThread):
    def __init__(
        self,
        ctx,
        vocab: Vocab,
        *,
        slots: int,
        batch_size: int,
        context_length: int,
        max_waiting: int,
        reuse_prefixes: bool = True,
        gather_for: float | None = None,
    ):
        # Capacity counts running plus waiting, so max_waiting=0 still fills the slots.
        super().__init__("llama.cpp engine", slots + max_waiting, gather_for=gather_for)
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = vocab
        self._batch = Batch(batch_size)
        self._context_length = context_length
        self._free_slots = list(range(slots))  # a heap: the lowest free slot is used first
        self._reuse_prefixes = reuse_prefixes
        self._slot_tokens: list[list[int]] = [[] for _ in range(slots)]  # what each free slot's KV cache holds
        self._steps = Steps(ctx, self._batch, vocab.eog_ids, vocab.size, slots, context_length)
        self._tags = itertools.count()
        self._streams: dict[int, Sequence] = {}  # by tag: the sequences the event loop still sends deltas to
        self._loop.add_reader(self._steps.notify_fd, self._on_notify)
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------

    def submit(
        self, tokens: list[int], params: SamplingParams, grammar: str | None, shown: frozenset[int] = frozenset(),
        watch: BudgetWatch | None = None,
    ) -> Sequence:  # fmt: skip
        sequence = Sequence(list(tokens), params, grammar, asyncio.Queue(), next(self._tags), shown=shown,
                            watch=watch, watched=len(tokens))  # fmt: skip
        sequence.stops = StopMatcher(params.stop)
        self._enqueue(sequence)
        self._streams[sequence.tag] = sequence
        return sequence

    def forget(self, sequence: Sequence) -> None:
        """The sequence's stream has ended, however it ended: tokens still in the ring for it are dropped."""
        self._streams.pop(sequence.tag, None)

    def stop(self) -> None:
        super().stop()
        self._loop.call_soon_threadsafe(self._close_ring)

    def _close_ring(self) -> None:
        self._loop.remove_reader(self._steps.notify_fd)
        self._steps.close()

    def _post(self, item: Any) -> None:
        self._steps.interrupt()  # C steps return to look at the inbox
        super()._post(item)

    def _on_notify(self) -> None:
        try:
            os.eventfd_read(self._steps.notify_fd)
        except BlockingIOError:  # a wake-up with nothing counted: the ring is read all the same
            pass
        self._drain()

    def _deliver(self, items: list) -> None:
        self._drain()  # a sequence's tokens before an error that follows them
        super()._deliver(items)

    def _drain(self) -> None:
        streams = self._streams
        for tag, token, finish in self._steps.take():
            sequence = streams.get(tag)
            if sequence is not None:
                self._send_token(sequence, token, finish)

    def _send_token(self, sequence: Sequence, token: int, finish_code: int) -> None:
        """A sampled token becomes the sequence's next delta: its text, held back while it may start a stop
        sequence, and the finish. Only sequences still in `_streams` get here: an ended one is forgotten."""
        end_of_text = finish_code == FINISHED_EOG
        text = "" if end_of_text else sequence.decoder.decode(self._vocab.piece(token, special=token in sequence.shown))
        text, hit_stop = sequence.stops.feed(text)
        finish = None
        if end_of_text or hit_stop:
            finish = "stop"
        elif finish_code == FINISHED_LENGTH:
            finish = "length"
        if finish and not hit_stop:
            text += sequence.decoder.decode(b"", final=True) + sequence.stops.flush()
        chosen = [sequence.logprobs.popleft()] if sequence.logprobs else []
        cached = sequence.reused if sequence.sent == 0 else 0
        sequence.sent += 1
        sequence.inbox.put_nowait(Delta(text=text, tokens=1, logprobs=chosen, finish_reason=finish,
                                        stop_sequence=hit_stop, cached_tokens=cached))  # fmt: skip
        if finish:
            self.forget(sequence)
            if not finish_code:  # a stop sequence: the engine's thread would go on with it
                sequence.cancel()
                self.wake()

    # ---- worker side -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._steps.clear_interrupt()  # before the inbox: whatever comes in later interrupts C steps
                if self._take_inbox(block=not (self._running or self._waiting)):
                    self._drop_cancelled()
                self._admit()
                if self._running:
                    self._timed(self._step)
            except Exception as exc:  # never let the worker die silently: fail the sequences in flight
                log.exception("llama.cpp scheduler step failed")
                for sequence in list(self._running):
                    self._fail(sequence, exc)
            self._flush_outbox()
        for sequence in list(self._running) + list(self._waiting):
            self._fail(sequence, shutting_down())
        self._flush_outbox()

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._running if s.cancelled]:
            self._release(sequence)
        for sequence in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(sequence)
            self._admitted += 1

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            sequence = self._waiting.popleft()
            self._admitted += 1
            try:
                sequence.sampling = build_sampling(self._vocab, sequence.params, sequence.grammar)
            except Exception as exc:  # the sequence must hear about it, or its client waits forever
                self._send(sequence, exc)
                continue
            self._place(sequence)
            self._running.append(sequence)

    def _place(self, sequence: Sequence) -> None:
        """Give the sequence a slot, keeping the part of its prompt that slot's KV cache already holds."""
        slot, shared = self._choose_slot(sequence.tokens) if self._reuse_prefixes else (self._free_slots[0], 0)
        self._free_slots.remove(slot)
        heapq.heapify(self._free_slots)
        keep = min(shared, len(sequence.tokens) - 1)  # the last prompt token is decoded again for its logits
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)  # a cache that cannot be cut is cleared
            keep = 0
        sequence.slot, sequence.n_cached, sequence.reused = slot, keep, keep
        self._slot_tokens[slot] = []
        params = sequence.params
        left = min(params.max_tokens, self._context_length - len(sequence.tokens))
        flags = (0 if params.ignore_eos else STOP_AT_EOG) | (EMIT if sequence.native else 0)
        self._steps.occupy(slot, sequence.tag, len(sequence.tokens), keep, left, flags, sequence.sampling)
        if sequence.watch is not None:
            self._look(sequence)

    def _choose_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot for a prompt, and how many of its tokens that slot's KV cache holds.

        The lowest free slot keeps running slots contiguous (see _step). A slot whose cache shares at least
        MIN_PREFIX_REUSE tokens with the prompt may take its place: the one sharing most wins, the lower on a tie.
        """
        lowest = self._free_slots[0]
        shared = {slot: _common_prefix(self._slot_tokens[slot], prompt) for slot in self._free_slots}
        candidates = [slot for slot in shared if slot == lowest or shared[slot] >= MIN_PREFIX_REUSE]
        best = max(candidates, key=lambda slot: (shared[slot], -slot))
        return best, shared[best]

    def _step(self) -> None:
        if self._steps.ring_short():
            time.sleep(RING_WAIT_S)  # the event loop is behind: its unread tokens must not be overwritten
        elif all(s.decoding and s.native for s in self._running):
            self._run_in_c()
        else:
            self._step_in_python()

    def _run_in_c(self) -> None:
        """Steps in C until something needs Python: a sequence finished or reached its watch mark, something came in,
        or 50 ms passed."""
        status = self._steps.run()
        self._collect(self._running)
        if status not in RUN_STATUSES:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _step_in_python(self) -> None:
        """One step with prompt chunks in it, or a sequence that wants logprobs."""
        batch = self._batch
        batch.clear()
        outputs: list[Sequence] = []
        # Decoding sequences first (one token each) in slot order, then prompt chunks in arrival order.
        # llama.cpp puts tokens of several sequences into one micro-batch only while their sequence
        # ids rise by one (non-unified KV cache); any other order splits the step into one
        # micro-batch per sequence, each a full pass over the weights. Low slots are handed out
        # first, so the running sequences' slots stay contiguous.
        ordered = sorted(self._running, key=_batch_order)
        chunks: list[tuple[Sequence, int]] = []
        for sequence in ordered:
            room = batch.capacity - batch.size
            if room == 0:
                break
            pending = sequence.tokens[sequence.n_cached : sequence.n_cached + room]
            completes = sequence.n_cached + len(pending) == len(sequence.tokens)
            batch.add(pending, sequence.n_cached, sequence.slot, outputs=1 if completes else 0)
            if completes:
                outputs.append(sequence)
            chunks.append((sequence, len(pending)))
        status = llama_cpp.llama_decode(self._ctx, batch.native)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        columns = self._steps.columns
        for sequence, count in chunks:
            sequence.n_cached += count
            columns[sequence.slot, POS] = sequence.n_cached
        if outputs:
            self._steps.sample_outputs()
            self._after_sampling(outputs)

    def _after_sampling(self, outputs: list[Sequence]) -> None:
        """Sequences that wanted logprobs send their token now, with them; the sampled tokens join each
        sequence, and the finished leave."""
        columns = self._steps.columns
        rows = None if all(s.native for s in outputs) else output_logits(self._ctx, len(outputs), self._vocab.size)
        for row, sequence in enumerate(outputs):
            sequence.decoding = True
            columns[sequence.slot, FLAGS] |= DECODING
            if not sequence.native:
                self._send_with_logprobs(sequence, rows[row])
        self._collect(outputs)

    def _send_with_logprobs(self, sequence: Sequence, logits: np.ndarray) -> None:
        slot = sequence.slot
        token = int(self._steps.history[slot, self._steps.columns[slot, COUNT] - 1])
        sequence.logprobs.append(self._token_logprob(token, log_softmax(logits), sequence.params.logprobs))
        self._steps.emit(sequence.tag, token, int(self._steps.columns[slot, FINISHED]))

    def _collect(self, sequences: list[Sequence]) -> None:
        """What C did for these sequences, into Python: their new tokens and KV positions; the finished leave."""
        columns, history = self._steps.columns, self._steps.history
        for sequence in list(sequences):
            slot, known = sequence.slot, len(sequence.tokens)
            count = int(columns[slot, COUNT])
            if count > known:
                sequence.tokens.extend(history[slot, known:count].tolist())
            sequence.n_cached = int(columns[slot, POS])
            if columns[slot, FINISHED]:
                self._release(sequence)
            elif columns[slot, LEFT] <= columns[slot, WATCH]:
                self._look(sequence)

    def _look(self, sequence: Sequence) -> None:
        """A constrained sequence at its watch mark: from now on it writes only its closing, then ends, where that is
        due; else C steps it until the next mark."""
        try:
            closing = self._closing_due(sequence)
        except Exception:  # it goes on unwatched, rather than fail with every sequence in this step
            log.exception("the JSON budget watch failed")
            closing, sequence.watch = None, None
        if closing is not None:
            self._steps.resample(sequence.slot, closing)
            sequence.sampling.free()
            sequence.sampling, sequence.watch = closing, None
        if sequence.watch is None:
            self._steps.columns[sequence.slot, WATCH] = NO_WATCH

    def _closing_due(self, sequence: Sequence) -> SlotSampling | None:
        """The sequence's new text goes to its watch. Returns the sampling of exactly its closing where that is due;
        else None, with the next mark set."""
        columns, slot = self._steps.columns, sequence.slot
        new = sequence.tokens[sequence.watched :]
        sequence.watched = len(sequence.tokens)
        sequence.watch.feed_bytes(b"".join(self._vocab.piece(t, special=t in sequence.shown) for t in new))
        left = int(columns[slot, LEFT])
        decision = sequence.watch.decide(left)
        if decision.force is None:
            columns[slot, WATCH] = left - decision.wait
            return None
        tokens = text_tokens(self._vocab, decision.force, sequence.shown)
        return build_sampling(self._vocab, sequence.params, exact_grammar(tokens))

    def _token_logprob(self, token: int, logprobs, top: int) -> TokenLogprob:
        alternatives = []
        if top > 0:
            best = logprobs.argpartition(-top)[-top:]
            best = best[logprobs[best].argsort()[::-1]]
            alternatives = [self._describe(int(t), float(logprobs[t])) for t in best]
        return replace(self._describe(token, float(logprobs[token])), top=alternatives)

    def _describe(self, token: int, logprob: float) -> TokenLogprob:
        raw = self._vocab.piece(token, special=True)
        return TokenLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

    def _release(self, sequence: Sequence) -> None:
        """Free the slot; its KV cache stays for a later prompt that starts the same way."""
        self._slot_tokens[sequence.slot] = sequence.tokens[: sequence.n_cached]
        sequence.sampling.free()
        self._steps.vacate(sequence.slot)
        self._running.remove(sequence)
        heapq.heappush(self._free_slots, sequence.slot)

    def _fail(self, sequence: Sequence, error: Exception) -> None:
        if sequence in self._running:
            self._release(sequence)
            # After a failed decode the cache's contents are unknown: nothing in it may be reused.
            llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot, -1, -1)
            self._slot_tokens[sequence.slot] = []
        self._send(sequence, error)


def _common_prefix(cached: list[int], prompt: list[int]) -> int:
    count = 0
    for a, b in zip(cached, prompt):
        if a != b:
            break
        count += 1
    return count


def _batch_order(sequence: Sequence) -> tuple[bool, int]:
    prefilling = len(sequence.tokens) - sequence.n_cached > 1
    return prefilling, 0 if prefilling else sequence.slot
