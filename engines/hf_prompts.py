"""Prompt handling shared by the engines that use a Hugging Face tokenizer (transformers, vLLM).

Both render chats with the tokenizer's own chat template and tokenize off the event loop (on the engine's
prompt threads), so a request gets the same token ids, and the same usage counts, from either engine.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

from jinja2 import TemplateError

from engines.base import ChatTemplateRefused, ContextLengthExceeded, Prompt, UnsupportedFeature, too_long_to_tokenize
from engines.common import pair_too_long
from engines.text import INLINE_TOKENIZE_CHARS


def longest_piece(tokenizer) -> int | None:
    """The most input bytes one token covers, where none covers more than its own: a byte-level BPE (each character
    of a vocabulary entry stands for one byte) with no normaliser (which may drop text) and no added token that
    swallows the whitespace beside it. None for any other tokenizer: no bound then."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    config = json.loads(backend.to_str())
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    added = tokenizer.added_tokens_decoder.values()
    if (
        config.get("normalizer") or config["model"].get("type") != "BPE"
        or not any(step.get("type") == "ByteLevel" for step in steps) or any(t.lstrip or t.rstrip for t in added)
    ):  # fmt: skip
        return None
    return max([max(map(len, tokenizer.get_vocab())), *(len(t.content.encode()) for t in added)])


def require_reranker(model: str, config) -> None:
    """A reranker is a cross-encoder: a sequence classifier with one label, whose logit (through a sigmoid) is the
    relevance. Refused at load otherwise: loaded as a classifier, another model would score with an untrained head."""
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures) or config.num_labels != 1:
        raise ValueError(
            f"{model} is not a reranker: `task: rerank` needs a one-label sequence classifier (a cross-encoder), and "
            f"this is {'/'.join(architectures) or 'a model of unknown architecture'} with {config.num_labels} labels"
        )


@functools.cache
def reserved_template_names(tokenizer_class: type) -> frozenset[str]:
    """Names template variables may not take: `apply_chat_template`'s own arguments, and `messages`, which it
    passes to the template itself."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(tokenizer_class.apply_chat_template).parameters.values()
    return frozenset(p.name for p in parameters if p.kind in named and p.name != "self") | {"messages"}


class HFPrompts:
    """Mixin: the engine provides `self._tokenizer`, `self._longest_piece` (`longest_piece` of it),
    `self._require_ready()` and `self._off_loop()`."""

    async def chat_template(self) -> str | None:
        self._require_ready()
        return self._tokenizer.get_chat_template(tools=[])  # of a model with several templates, the one for tools

    async def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        template_args: dict[str, Any] | None = None, add_generation_prompt: bool = True,
    ) -> Prompt:  # fmt: skip
        self._require_ready()
        template_args = template_args or {}
        if clash := sorted(set(template_args) & reserved_template_names(type(self._tokenizer))):
            raise UnsupportedFeature(f"template variables {clash} are reserved", param="chat_template_kwargs")
        return await self._off_loop(self._render_chat, messages, tools, template_args, add_generation_prompt)

    def _render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     template_args: dict[str, Any], add_generation_prompt: bool) -> Prompt:  # fmt: skip
        """On a prompt thread: a template takes time that grows with the messages."""
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **template_args
            )
        except (TemplateError, TypeError) as exc:  # the template refused these messages (raise_exception) or
            # could not read them (a None content added to a string): the request's fault, not the server's
            raise ChatTemplateRefused.because(exc) from None
        tokens = self._encode(text, add_special=False, window=self.context_length(), param="messages")
        return Prompt(text=text, token_ids=tokens)

    async def encode_prompt(self, prompt: str | list[int], add_special: bool = True) -> Prompt:
        self._require_ready()
        if isinstance(prompt, list):
            self._check_token_ids(prompt, "prompt")
            return Prompt(text="", token_ids=list(prompt))
        tokens = await self._tokenize(prompt, window=self.context_length(), param="prompt", add_special=add_special)
        if not tokens and add_special:  # generation starts from at least one token
            tokens = [t for t in (self._tokenizer.bos_token_id, self._tokenizer.eos_token_id) if t is not None][:1]
        return Prompt(text=prompt, token_ids=tokens)

    async def _tokenize(self, text: str, *, window: int, param: str, add_special: bool = True) -> list[int]:
        """A raw text's tokens (with the special tokens the tokenizer adds, unless not `add_special`), on a prompt
        thread unless short."""
        encode = functools.partial(self._encode, add_special=add_special, window=window, param=param)
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return encode(text)
        return await self._off_loop(encode, text)

    def _encode(self, text: str, *, add_special: bool, window: int, param: str) -> list[int]:
        """`text`'s tokens, unless its bytes cannot fit `window` tokens: then refused before it is tokenized."""
        if self._longest_piece is not None:
            least = -(-len(text.encode()) // self._longest_piece)
            if least > window:
                raise too_long_to_tokenize(window, least, param)
        return self._tokenizer.encode(text, add_special_tokens=add_special)

    def _check_token_ids(self, tokens: list[int], param: str) -> None:
        size = len(self._tokenizer)
        if not tokens or any(t < 0 or t >= size for t in tokens):
            raise UnsupportedFeature(f"token ids must be in [0, {size})", param=param)

    async def decode(self, sequences: list[list[int]]) -> list[str]:
        self._require_ready()
        return await self._off_loop(self._decode, sequences)

    def _decode(self, sequences: list[list[int]]) -> list[str]:
        """On a prompt thread: a long list takes a while to check and decode."""
        for tokens in filter(None, sequences):
            self._check_token_ids(tokens, "tokens")
        return self._tokenizer.batch_decode(sequences)

    async def _embedding_inputs(self, inputs: list[str] | list[list[int]], window: int) -> list[list[int]]:
        """Token ids for each embedding input; 400 when one does not fit the model's window."""
        token_lists = []
        for item in inputs:
            if isinstance(item, str):
                tokens = await self._tokenize(item, window=window, param="input")
            else:
                self._check_token_ids(item, "input")
                tokens = item
            if len(tokens) > window:
                raise ContextLengthExceeded(
                    f"an input has {len(tokens)} tokens; this model embeds at most {window}", param="input"
                )
            token_lists.append(tokens)
        return token_lists

    async def _rerank_inputs(self, query: str, documents: list[str]) -> list[dict[str, list[int]]]:
        """Each (query, document) pair as the tokenizer's pair encoding (`input_ids`, and `token_type_ids` where the
        model reads segments), on a prompt thread; a pair longer than the window is refused (`pair_too_long`)."""
        return await self._off_loop(self._encode_pairs, query, documents, self.context_length())

    def _encode_pairs(self, query: str, documents: list[str], window: int) -> list[dict[str, list[int]]]:
        if not documents:
            return []
        encoded = self._tokenizer([query] * len(documents), documents, return_attention_mask=False, verbose=False)
        pairs = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        for index, pair in enumerate(pairs):
            if len(pair["input_ids"]) > window:
                raise pair_too_long(window, index, len(pair["input_ids"]))
        return pairs
