"""Choosing the next token from a transformers model's logits, one sequence at a time.

The order follows llama.cpp's sampler chain so both engines treat a request alike: logit bias,
penalties, the grammar mask (JSON, tool calls), then temperature, top-k, top-p and min-p, then a draw from the
sequence's own seeded generator (greedy at temperature 0). Logprobs report the model's raw
distribution, as OpenAI's do.
"""

from __future__ import annotations

import os
from collections import deque

import llguidance
import llguidance.torch
import numpy as np
import torch

from engines.base import END_OFF, SamplingParams, UnsupportedFeature
from engines.json_budget import TokenCloser

# Penalties look back over the last 256 generated tokens, as the llama.cpp engine's do.
PENALTY_WINDOW = 256


class TokenChooser:
    """Per-sequence sampling state: the generator, token counts for penalties, the grammar matcher, and the closer
    that writes a JSON answer's closing when its token budget runs out."""

    def __init__(self, params: SamplingParams, vocab_size: int, eos_ids: list[int],
                 matcher: llguidance.LLMatcher | None, device: torch.device,
                 closer: TokenCloser | None = None):  # fmt: skip
        self.params = params
        self.matcher = matcher
        self.closer = closer
        self.generated: list[int] = []
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little"))
        self._vocab_size = vocab_size
        self._bias = self._bias_vector(params, eos_ids, vocab_size, device)
        self._recent: deque[int] = deque(maxlen=PENALTY_WINDOW)
        self._device = device
        self._mask = llguidance.torch.allocate_token_bitmask(1, vocab_size) if matcher else None

    @staticmethod
    def _bias_vector(params: SamplingParams, eos_ids: list[int], vocab_size: int, device) -> torch.Tensor | None:
        biases = dict(params.logit_bias)
        if any(token < 0 or token >= vocab_size for token in biases):
            raise UnsupportedFeature(f"logit_bias token ids must be in [0, {vocab_size})", param="logit_bias")
        if params.ignore_eos:
            biases.update({token: END_OFF for token in eos_ids})
        if not biases:
            return None
        vector = torch.zeros(vocab_size, device=device)
        vector[torch.tensor(list(biases), dtype=torch.long, device=device)] = torch.tensor(
            list(biases.values()), dtype=vector.dtype, device=device
        )
        return vector

    def choose(self, logits: torch.Tensor, left: int) -> int:
        """Pick the next token from one row of float32 logits (modified in place); `left`: tokens the sequence may
        still write, this one included."""
        token = self.closer.next_token(self.generated, left) if self.closer is not None else None
        if token is None:
            token = self._sample(logits[: self._vocab_size])
        self._recent.append(token)
        if self.closer is not None:
            self.generated.append(token)
        if self.matcher is not None:
            self.matcher.consume_token(token)
        return token

    def _sample(self, logits: torch.Tensor) -> int:
        if self._bias is not None:
            logits += self._bias
        self._penalise(logits)
        if self.matcher is not None:
            llguidance.torch.fill_next_token_bitmask(self.matcher, self._mask, 0)
            forbid(logits, self._mask)
        return self._draw(logits)

    def _penalise(self, logits: torch.Tensor) -> None:
        params = self.params
        if not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0):
            return
        recent = torch.tensor(list(self._recent), dtype=torch.long, device=self._device)
        counts = torch.bincount(recent, minlength=logits.numel())[: logits.numel()]
        seen = counts > 0
        if params.repetition_penalty != 1.0:
            hit = logits[seen]
            logits[seen] = torch.where(hit > 0, hit / params.repetition_penalty, hit * params.repetition_penalty)
        logits -= params.presence_penalty * seen + params.frequency_penalty * counts

    def _draw(self, logits: torch.Tensor) -> int:
        params = self.params
        if params.temperature <= 0:
            return int(logits.argmax())
        logits /= params.temperature
        if 0 < params.top_k < logits.numel():
            logits[logits < torch.topk(logits, params.top_k).values[-1]] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            beyond = ordered.cumsum(0) - ordered > params.top_p  # keep the smallest head reaching top_p
            probs[order[beyond]] = 0
        if params.min_p > 0:
            probs[probs < params.min_p * probs.max()] = 0
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def finished_grammar(self) -> bool:
        return self.matcher is not None and self.matcher.is_stopped()


def forbid(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf on each token the grammar's bitmask leaves out (bit i%32 of word i//32). Unpacked by numpy: llguidance's
    own torch kernel compiles itself on first use, seconds of a request's time and a C compiler on CPU."""
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: logits.numel()]
    logits.masked_fill_(torch.from_numpy(allowed).to(logits.device) == 0, float("-inf"))
