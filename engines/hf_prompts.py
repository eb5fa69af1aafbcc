"""Prompt handling shared by the engines that use a Hugging Face tokenizer (transformers, vLLM).

Both render chats with the tokenizer's own chat template and tokenize off the event loop, so a
request gets the same token ids, and the same usage counts, from either engine.
"""

from __future__ import annotations

import asyncio
import functools

from engines.base import ContextLengthExceeded, Prompt, UnsupportedFeature
from engines.text import tokenize


class HFPrompts:
    """Mixin: the engine provides `self._tokenizer` and `self._require_ready()`."""

    async def render_chat(self, messages: list[dict[str, str]]) -> Prompt:
        self._require_ready()
        text = await asyncio.to_thread(
            self._tokenizer.apply_chat_template, messages, tokenize=False, add_generation_prompt=True
        )
        return Prompt(text=text, token_ids=await self._tokenize(text, add_special=False))

    async def encode_prompt(self, prompt: str | list[int]) -> Prompt:
        self._require_ready()
        if isinstance(prompt, list):
            self._check_token_ids(prompt, "prompt")
            return Prompt(text="", token_ids=list(prompt))
        tokens = await self._tokenize(prompt, add_special=True)
        fallback = [t for t in (self._tokenizer.bos_token_id, self._tokenizer.eos_token_id) if t is not None][:1]
        return Prompt(text=prompt, token_ids=tokens or fallback)

    async def _tokenize(self, text: str, add_special: bool) -> list[int]:
        return await tokenize(functools.partial(self._tokenizer.encode, add_special_tokens=add_special), text)

    def _check_token_ids(self, tokens: list[int], param: str) -> None:
        size = len(self._tokenizer)
        if not tokens or any(t < 0 or t >= size for t in tokens):
            raise UnsupportedFeature(f"token ids must be in [0, {size})", param=param)

    async def _embedding_inputs(self, inputs: list[str] | list[list[int]], window: int) -> list[list[int]]:
        """Token ids for each embedding input; 400 when one does not fit the model's window."""
        token_lists = []
        for item in inputs:
            if isinstance(item, str):
                tokens = await self._tokenize(item, add_special=True)
            else:
                self._check_token_ids(item, "input")
                tokens = item
            if len(tokens) > window:
                raise ContextLengthExceeded(
                    f"an input has {len(tokens)} tokens; this model embeds at most {window}", param="input"
                )
            token_lists.append(tokens)
        return token_lists
