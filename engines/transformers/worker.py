"""One thread owns the transformers model: it decodes the running sequences in turn, a token each.

Each sequence keeps its own KV cache, so a step is one forward per running sequence (its whole prompt
the first time, one token after that). Sequences join and leave between steps, at most `slots` run at
once and the rest wait in arrival order; a cancelled sequence is dropped at the next step. The event
loop only submits work and receives `Delta`s; it never runs the model.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from engines.base import Delta, GenerationFailed, SamplingParams, TokenLogprob
from engines.llguidance_grammars import special_tokens
from engines.text import StopMatcher
from engines.transformers.sampling import TokenChooser
from engines.worker_thread import WorkerThread, shutting_down

log = logging.getLogger(__name__)


class IncrementalText:
    """Turns a growing list of token ids into new text, holding back bytes of an unfinished character.

    Special tokens are left out: those in `hidden`, or all where it is None."""

    def __init__(self, tokenizer, hidden: frozenset[int] | None = None):
        self._tokenizer = tokenizer
        self._hidden = hidden
        self._ids: list[int] = []
        self._start = 0  # window start: decoding from here keeps the tokenizer's spacing right
        self._emitted = 0  # tokens whose text has been sent

    def add(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._start : self._emitted])
        after = self._decode(self._ids[self._start :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._start, self._emitted = self._emitted, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        if self._hidden is None:
            return self._tokenizer.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode([i for i in ids if i not in self._hidden], skip_special_tokens=False)


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    chooser: TokenChooser
    inbox: asyncio.Queue
    text: IncrementalText
    stops: StopMatcher
    pending: list[int] = field(default_factory=list)  # tokens the next forward feeds
    cache: Any = None
    generated: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Worker(WorkerThread):
    def __init__(self, model, tokenizer, *, slots: int, context_length: int, max_waiting: int):
        super().__init__("transformers worker", slots + max_waiting)  # max_waiting=0 still fills the slots
        self._model = model
        self._tokenizer = tokenizer
        self._eos = set(eos_ids(model, tokenizer))
        self._specials = frozenset(special_tokens(tokenizer).values())
        self._slots = slots
        self._context_length = context_length
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, chooser: TokenChooser,
               shown: frozenset[int] = frozenset()) -> Sequence:  # fmt: skip
        """`shown`: special tokens the text keeps (it leaves out all others)."""
        text = IncrementalText(self._tokenizer, self._specials - shown if shown else None)
        sequence = Sequence(list(prompt), params, chooser, asyncio.Queue(), text, StopMatcher(params.stop),
                            pending=list(prompt))  # fmt: skip
        self._enqueue(sequence)
        return sequence

    def _run(self) -> None:
        while not self._stopping:
            self._take_inbox(block=not (self._running or self._waiting))
            self._running = [s for s in self._running if not s.cancelled]
            self._admit()
            for sequence in list(self._running):
                try:
                    self._timed(self._step, sequence)
                except Exception as exc:  # the sequence must hear about it, or its client waits forever
                    log.exception("transformers decode step failed")
                    self._running.remove(sequence)
                    # The engine's fault, whatever it raised: its request's settings were checked before it came in.
                    self._send(sequence, GenerationFailed(f"generation failed: {exc}"))
            self._flush_outbox()
        for sequence in self._running + list(self._waiting):
            self._send(sequence, shutting_down())
        self._flush_outbox()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self._slots:
            sequence = self._waiting.popleft()
            self._admitted += 1
            if not sequence.cancelled:
                self._running.append(sequence)

    @torch.inference_mode()
    def _step(self, sequence: Sequence) -> None:
        inputs = torch.tensor([sequence.pending], device=self._model.device)
        output = self._model(input_ids=inputs, past_key_values=sequence.cache, use_cache=True)
        sequence.cache = output.past_key_values
        logits = output.logits[0, -1].float()
        params = sequence.params
        raw = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
        left = min(params.max_tokens, self._context_length - len(sequence.prompt)) - sequence.generated
        token = sequence.chooser.choose(logits, left)
        sequence.pending = [token]
        sequence.generated += 1
        end_of_text = token in self._eos and not params.ignore_eos
        text, hit_stop = sequence.stops.feed("" if end_of_text else sequence.text.add(token))
        finish = None
        if end_of_text or hit_stop or sequence.chooser.finished_grammar():  # a complete JSON value ends it too
            finish = "stop"
        elif sequence.generated >= params.max_tokens or (
            len(sequence.prompt) + sequence.generated >= self._context_length
        ):
            finish = "length"
        if finish and not hit_stop:
            text += sequence.stops.flush()
        chosen = [self._token_logprob(token, raw, params.logprobs)] if raw is not None else []
        self._send(sequence, Delta(text=text, tokens=1, logprobs=chosen, finish_reason=finish, stop_sequence=hit_stop))
        if finish:
            self._running.remove(sequence)

    def _token_logprob(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        alternatives = []
        if top > 0:
            values, ids = torch.topk(logprobs, top)
            alternatives = [self._describe(int(t), float(v)) for t, v in zip(ids, values)]
        chosen = self._describe(token, float(logprobs[token]))
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, alternatives)

    def _describe(self, token: int, logprob: float) -> TokenLogprob:
        text = self._tokenizer.decode([token])
        return TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()))


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (often a list)."""
    configured = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})
