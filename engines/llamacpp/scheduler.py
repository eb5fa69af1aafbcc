"""Continuous batching for llama.cpp: one worker thread owns the context and decodes every running
sequence in one `llama_decode` per step.

Each step puts one token for every decoding sequence into the batch, then fills what is left of
`batch_size` with prompt chunks of newly admitted sequences, so a long prompt never stalls running
streams. Sequences join and leave between steps; a cancelled one frees its slot at the next step.
The event loop only submits sequences and receives `Delta`s; it never calls into llama.cpp here.

A finished sequence leaves its KV cache in its slot (prefix reuse): a new prompt goes to the free slot
that already holds the longest start of it, and only the rest is decoded, so a shared system prompt or
a growing conversation is not computed again.
"""

from __future__ import annotations

import asyncio
import codecs
import heapq
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import llama_cpp
import numpy as np

from engines.base import Delta, SamplingParams, TokenLogprob
from engines.llamacpp.native import Batch, Sampler, Vocab, build_sampler, log_softmax, output_logits
from engines.text import StopMatcher
from engines.worker_thread import WorkerThread

log = logging.getLogger(__name__)


MIN_PREFIX_REUSE = 16  # shorter shared starts do not justify leaving the lowest free slot


@dataclass(eq=False)
class Sequence:
    tokens: list[int]
    params: SamplingParams
    grammar: str | None
    inbox: asyncio.Queue
    slot: int = -1
    n_cached: int = 0
    reused: int = 0  # prompt tokens whose KV cache was already in the slot
    generated: int = 0
    sampler: Sampler | None = None
    cancelled: bool = False
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    stops: StopMatcher | None = None

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
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------

    def submit(self, tokens: list[int], params: SamplingParams, grammar: str | None) -> Sequence:
        sequence = Sequence(list(tokens), params, grammar, asyncio.Queue())
        self._enqueue(sequence)
        return sequence

    # ---- worker side -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
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
            self._fail(sequence, RuntimeError("the engine is shutting down"))
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
                sequence.sampler = build_sampler(self._vocab, sequence.params, sequence.grammar)
            except Exception as exc:  # the sequence must hear about it, or its client waits forever
                self._send(sequence, exc)
                continue
            self._place(sequence)
            sequence.stops = StopMatcher(sequence.params.stop)
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
        batch = self._batch
        batch.clear()
        outputs: list[tuple[Sequence, int]] = []
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
            index = batch.add(pending, sequence.n_cached, sequence.slot, outputs=1 if completes else 0)
            if completes:
                outputs.append((sequence, index))
            chunks.append((sequence, len(pending)))
        status = llama_cpp.llama_decode(self._ctx, batch.native)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        for sequence, count in chunks:
            sequence.n_cached += count
        if outputs:
            rows = output_logits(self._ctx, len(outputs), self._vocab.size)
            for (sequence, index), logits in zip(outputs, rows):
                self._sample(sequence, index, logits)

    def _sample(self, sequence: Sequence, index: int, logits: np.ndarray) -> None:
        params = sequence.params
        logprobs = log_softmax(logits) if params.logprobs is not None else None
        token = sequence.sampler.sample(self._ctx, index, logits)
        sequence.tokens.append(token)
        sequence.generated += 1
        end_of_text = self._vocab.is_eog(token) and not params.ignore_eos
        text = "" if end_of_text else sequence.decoder.decode(self._vocab.piece(token))
        text, hit_stop = sequence.stops.feed(text)
        finish = None
        if end_of_text or hit_stop:
            finish = "stop"
        elif sequence.generated >= params.max_tokens or len(sequence.tokens) >= self._context_length:
            finish = "length"
        if finish and not hit_stop:
            text += sequence.decoder.decode(b"", final=True) + sequence.stops.flush()
        chosen = []
        if logprobs is not None:
            chosen = [self._token_logprob(token, logprobs, params.logprobs)]
        cached = sequence.reused if sequence.generated == 1 else 0
        self._send(sequence, Delta(text=text, tokens=1, logprobs=chosen, finish_reason=finish, cached_tokens=cached))
        if finish:
            self._release(sequence)

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
        sequence.sampler.free()
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
