"""The llama.cpp engine: a GGUF model loaded in this process, served by the batching scheduler.

A reranker (task "rerank": a GGUF converted from a one-label sequence classifier) only scores (query, document)
pairs, with llama.cpp's rank pooling, on a thread of its own.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import os
from typing import Any, AsyncIterator

import gguf
import jinja2
import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from engines.base import (
    ChatTemplateRefused,
    ContextLengthExceeded,
    Delta,
    Embeddings,
    EngineConfig,
    Prompt,
    SamplingParams,
    Scores,
    UnsupportedFeature,
    too_long_to_tokenize,
)
from engines.common import BaseEngine, pair_too_long
from engines.json_budget import BudgetWatch, closing_plan
from engines.llamacpp.native import (
    Batch,
    Vocab,
    json_grammar,
    model_metadata,
    native_logs_while_loading,
    text_tokens,
    tool_call_grammar,
)
from engines.llamacpp.scheduler import Scheduler
from engines.worker_thread import JobThread, deltas

log = logging.getLogger(__name__)
MAX_EMBEDDING_TOKENS = 512
CPU_GATHER_S = 0.003  # how long a request reaching an idle CPU engine waits for the rest of its burst
RANK_SEQUENCES = 16  # a reranker's pairs scored in one encode, at most (and at most its window of tokens)


class LlamaCppEngine(BaseEngine[Scheduler]):
    name = "llamacpp"

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._model = None
        self._ctx = None
        self._embed_ctx = None
        self._rank_ctx = None
        self._rank_batch: Batch | None = None
        self._pair_marks: tuple[list[int], list[int], list[int]] = ([], [], [])  # before, between, after
        self._vocab: Vocab | None = None
        self._chat_template: str | None = None
        self._chat_formatter: Jinja2ChatFormatter | None = None
        self._scheduler: Scheduler | JobThread | None = None  # a reranker's: a JobThread
        self._n_embd: int | None = None  # the embedding width, known when embeddings are on

    # ---- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        with native_logs_while_loading():
            await super().load()

    def _load_blocking(self) -> None:
        config = self.config
        if not os.path.isfile(config.model_path):
            raise FileNotFoundError(f"model file not found: {config.model_path}")
        # CUDA graphs off: with them on, a step holding several prompts' chunks now and then never finished
        # on a GPU (llama-server from the same build hung the same way); off costs some throughput at few
        # streams (docs/benchmarks-history.md). ggml reads the variable once, before the first graph runs.
        os.environ.setdefault("GGML_CUDA_DISABLE_GRAPHS", "1")
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = config.gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(config.model_path.encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {config.model_path}")
        self._vocab = Vocab(self._model)
        if self._task == "rerank":
            self._load_reranker()
            return
        self._chat_template = model_metadata(self._model, "tokenizer.chat_template")
        self._chat_formatter = self._load_chat_formatter()
        # One KV stream of `context_length` cells per slot, so every request gets the whole window.
        self._ctx = self._new_context(
            n_ctx=config.context_length * config.parallel, n_batch=config.batch_size, n_seq_max=config.parallel
        )
        if config.embedding:
            size = self._embedding_window()
            self._embed_ctx = self._new_context(n_ctx=size, n_batch=size, n_seq_max=1,
                                                pooling=llama_cpp.LLAMA_POOLING_TYPE_MEAN)  # fmt: skip
            self._n_embd = llama_cpp.llama_model_n_embd(self._model)

    def _embedding_window(self) -> int:
        # A pooled embedding needs the whole input in one micro-batch, and the compute buffer grows
        # with it (4096 tokens cost ~800 MB for this vocabulary), so inputs are capped like BERT's.
        return min(self.config.context_length, MAX_EMBEDDING_TOKENS)

    def _load_reranker(self) -> None:
        """A one-label classifier head (its labels are written by the converter of a sequence classifier), run by
        llama.cpp's rank pooling: the first token's hidden state through the head, one logit a sequence."""
        model, path = self._model, self.config.model_path
        if llama_cpp.llama_model_n_cls_out(model) != 1 or llama_cpp.llama_model_cls_label(model, 0) is None:
            raise ValueError(
                f"{path} is not a reranker: `task: rerank` needs a GGUF converted from a one-label sequence "
                "classifier (a cross-encoder)"
            )  # fmt: skip
        if model_metadata(model, "general.architecture") == "bert" and _without_pooler(path):
            log.warning("%s has no BERT pooler (llama.cpp's converter drops it): its scores are the classifier's on "
                        "the unpooled [CLS] state, not the model's (docs/design/rerank.md)", path)  # fmt: skip
        window = self._rank_window()
        self._rank_ctx = self._new_context(n_ctx=window, n_batch=window, n_seq_max=RANK_SEQUENCES,
                                           pooling=llama_cpp.LLAMA_POOLING_TYPE_RANK)  # fmt: skip
        self._rank_batch = Batch(window)
        # llama-server's pair for an encoder: BOS query EOS SEP document EOS, each where the vocabulary adds it (for
        # a BERT vocabulary [CLS] query [SEP] document [SEP], what the Hugging Face tokenizer's pair encoding gives).
        vocab = self._vocab.ptr
        end = self._vocab.eos if self._vocab.eos != llama_cpp.LLAMA_TOKEN_NULL else llama_cpp.llama_vocab_sep(vocab)
        before = [self._vocab.bos] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
        after = [end] if llama_cpp.llama_vocab_get_add_eos(vocab) else []
        between = after + ([llama_cpp.llama_vocab_sep(vocab)] if llama_cpp.llama_vocab_get_add_sep(vocab) else [])
        self._pair_marks = (before, between, after)

    def context_length(self) -> int:
        return self._rank_window() if self._rank_ctx else self.config.context_length

    def _rank_window(self) -> int:
        """The tokens of one pair, at most: LLM_CTX, capped by the positions the model was trained on."""
        return min(self.config.context_length, llama_cpp.llama_model_n_ctx_train(self._model))

    def _new_context(self, *, n_ctx: int, n_batch: int, n_seq_max: int, pooling: int | None = None):
        threads = self.config.threads or os.cpu_count() or 1
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False
        params.no_perf = True
        if pooling is not None:
            params.embeddings = True
            params.pooling_type = pooling
        if pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            # Pairs share one encode and no cache: each takes the window's positions. Flash attention, which
            # rounds through f16 on a CPU, off: scores stay closer to the model's (docs/design/rerank.md).
            params.kv_unified = True
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        return ctx

    def _load_chat_formatter(self) -> Jinja2ChatFormatter | None:
        """llama-cpp-python's Jinja renderer does what Hugging Face's does for templates: a sandbox, loop controls,
        `tojson` with its arguments, `raise_exception`, `strftime_now`, and any extra variables."""
        if self._chat_template is None:
            return None
        vocab = self._vocab
        return Jinja2ChatFormatter(
            template=self._chat_template,
            eos_token=vocab.piece(vocab.eos, special=True).decode(errors="replace"),
            bos_token=vocab.piece(vocab.bos, special=True).decode(errors="replace"),
        )

    def _start(self) -> None:
        config = self.config
        if self._task == "rerank":
            self._scheduler = JobThread("llama.cpp reranker")
            return
        self._scheduler = Scheduler(
            self._ctx,
            self._vocab,
            slots=config.parallel,
            batch_size=config.batch_size,
            context_length=config.context_length,
            max_waiting=config.max_waiting,
            reuse_prefixes=config.options.get("enable_prefix_caching") is not False,
            # A burst's prompts share a step: on a GPU it takes about as long for all of them as for one,
            # and on a CPU a step of several prompts still computes each faster than a step of one. On a CPU
            # a burst's requests arrive further apart, so the first waits CPU_GATHER_S for the others when the
            # engine is idle (docs/benchmarks-history.md).
            gather_for=0.0 if config.gpu_layers != 0 else CPU_GATHER_S,
        )

    def _runner(self) -> Scheduler | JobThread | None:
        return self._scheduler

    async def close(self) -> None:
        await self._end_prompt_work()
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
            self._scheduler = None
        for ctx in (self._ctx, self._embed_ctx, self._rank_ctx):
            if ctx:
                llama_cpp.llama_free(ctx)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._ctx = self._embed_ctx = self._rank_ctx = self._model = None
        self._state = "closed"

    # ---- info ------------------------------------------------------------------------------

    def _device_type(self) -> str:
        return "cuda" if self.config.gpu_layers else "cpu"

    def _embedding_dimensions(self) -> int | None:
        return self._n_embd

    def _memory_bytes(self) -> int:
        """Weights plus the f16 KV cache of every context: what the memory governor counts for this model."""
        model = self._model
        if not model:
            return 0
        head_dim = llama_cpp.llama_model_n_embd(model) // max(llama_cpp.llama_model_n_head(model), 1)
        per_cell = 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim * 2
        cells = self.config.context_length * self.config.parallel if self._ctx else 0  # a reranker keeps no cache
        cells += self._embedding_window() if self._embed_ctx else 0
        return llama_cpp.llama_model_size(model) + per_cell * cells

    # ---- prompts ---------------------------------------------------------------------------

    async def chat_template(self) -> str | None:
        return self._chat_template

    async def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        template_args: dict[str, Any] | None = None, add_generation_prompt: bool = True,
    ) -> Prompt:  # fmt: skip
        scheduler = self._require_ready()
        if self._chat_formatter is None:
            raise UnsupportedFeature(
                f"model {self.config.served_name!r} has no chat template; use /v1/completions", param="model"
            )
        formatter = self._chat_formatter
        if not add_generation_prompt:  # a shallow copy shares the compiled template
            formatter = copy.copy(formatter)
            formatter.add_generation_prompt = False
        with scheduler.intake():
            return await self._off_loop(self._render_chat, formatter, messages, tools, template_args or {})

    def _render_chat(self, formatter: Jinja2ChatFormatter, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None, template_args: dict[str, Any]) -> Prompt:  # fmt: skip
        """On a prompt thread: a template takes time that grows with the messages."""
        try:
            text = formatter(messages=messages, tools=tools, **template_args).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as exc:  # ValueError: the template's raise_exception
            raise ChatTemplateRefused.because(exc) from exc
        window = self.context_length()
        tokens = self._encode(text, add_special=False, parse_special=True, window=window, param="messages")
        return Prompt(text=text, token_ids=tokens)

    async def encode_prompt(self, prompt: str | list[int], add_special: bool = True) -> Prompt:
        scheduler = self._require_ready()
        if isinstance(prompt, list):
            self._check_token_ids(prompt, "prompt")
            return Prompt(text="", token_ids=list(prompt))
        # The worker's hand-over waits for a prompt about to be submitted (`WorkerThread.intake`).
        with scheduler.intake():
            tokens = await self._encode_raw(prompt, window=self.context_length(), param="prompt",
                                            add_special=add_special)  # fmt: skip
        if not tokens and add_special:  # generation starts from at least one token
            tokens = [self._vocab.bos]
        return Prompt(text=prompt, token_ids=tokens)

    def _encode_raw(self, text: str, *, window: int, param: str, add_special: bool = True) -> asyncio.Future:
        """A raw text's tokens, on a prompt thread: with BOS (unless not `add_special`), and special tokens' texts
        read as plain text."""
        return self._off_loop(
            self._encode, text, add_special=add_special, parse_special=False, window=window, param=param
        )  # fmt: skip

    def _encode(self, text: str, *, add_special: bool, parse_special: bool, window: int, param: str) -> list[int]:
        """On a prompt thread: llama.cpp's tokenizer is slow (it builds its regular expressions on every call)
        and releases the GIL, so a burst's prompts are tokenized side by side. A text that cannot fit `window`
        tokens is refused before it is tokenized (which takes time growing with its bytes)."""
        parts, least = self._vocab.split_prompt(text.encode(), parse_special=parse_special, most=window)
        if least > window:
            raise too_long_to_tokenize(window, least, param)
        return self._vocab.tokenize(parts, add_special=add_special, parse_special=parse_special)

    def _check_token_ids(self, tokens: list[int], param: str) -> None:
        if not tokens or any(t < 0 or t >= self._vocab.size for t in tokens):
            raise UnsupportedFeature(f"token ids must be in [0, {self._vocab.size})", param=param)

    async def decode(self, sequences: list[list[int]]) -> list[str]:
        self._require_ready()
        return await self._off_loop(self._decode, sequences)

    def _decode(self, sequences: list[list[int]]) -> list[str]:
        """On a prompt thread (a long list takes a while to check): the pieces joined, as llama-server's /detokenize
        does."""
        for tokens in filter(None, sequences):
            self._check_token_ids(tokens, "tokens")
        piece = self._vocab.piece
        return [b"".join(piece(t, special=True) for t in tokens).decode(errors="replace") for tokens in sequences]

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        scheduler = self._require_ready()
        grammar, shown, watch = None, frozenset(), None
        if params.tool_calls is not None or params.json_schema is not None:  # most requests have neither
            grammar, shown, watch = await asyncio.to_thread(self._constraint, params)
        sequence = scheduler.submit(prompt.token_ids, params, grammar, shown, watch)
        try:
            async for delta in deltas(sequence, scheduler):
                yield delta
        finally:
            scheduler.forget(sequence)

    def _constraint(self, params: SamplingParams) -> tuple[str, frozenset[int], BudgetWatch | None]:
        """On a thread: the constraint's grammar, the control tokens its markers show, and the watch that closes its
        JSON before the token budget runs out."""
        shown = frozenset()
        if params.tool_calls is not None:
            grammar = tool_call_grammar(params.tool_calls)
            # A control token in the markers ("[TOOL_CALLS]") is text the client's parser must see.
            shown = self._vocab.control_tokens_in(params.tool_calls.begin + params.tool_calls.end)
        else:
            grammar = json_grammar(params.json_schema)
        plan = closing_plan(params)
        watch = plan.watch(lambda text: len(text_tokens(self._vocab, text, shown))) if plan is not None else None
        return grammar, shown, watch

    # ---- embeddings ------------------------------------------------------------------------

    async def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        scheduler = self._require_ready("embed")
        if self._embed_ctx is None:
            raise UnsupportedFeature("embeddings are disabled for this model (LLM_EMBEDDING=false)", param="model")
        token_lists = []
        for item in inputs:
            if isinstance(item, str):
                tokens = await self._encode_raw(item, window=self._embedding_window(), param="input")
            else:
                self._check_token_ids(item, "input")
                tokens = item
            if len(tokens) > self._embedding_window():
                raise ContextLengthExceeded(
                    f"an input has {len(tokens)} tokens; this model embeds at most {self._embedding_window()}",
                    param="input",
                )
            token_lists.append(tokens)
        vectors = await scheduler.call_each(self._embed_one, token_lists)
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(t) for t in token_lists))

    def _embed_one(self, tokens: list[int]) -> list[float]:
        """Mean-pooled, L2-normalised embedding; runs on the scheduler's worker thread."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._embed_ctx), True)
        batch = Batch(len(tokens))
        batch.add(tokens, 0, 0, outputs=len(tokens))
        if llama_cpp.llama_decode(self._embed_ctx, batch.native) != 0:
            raise RuntimeError("llama_decode failed while embedding")
        pointer = llama_cpp.llama_get_embeddings_seq(self._embed_ctx, 0)
        vector = np.ctypeslib.as_array(pointer, shape=(self._n_embd,)).astype(np.float64)
        norm = np.linalg.norm(vector)
        return (vector / norm if norm > 0 else vector).tolist()

    # ---- reranking -------------------------------------------------------------------------

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        if self._task != "rerank":
            return await super().rerank(query, documents)
        jobs = self._require_ready("rerank")
        pairs = await self._off_loop(self._rank_pairs, query, documents)
        scores = []
        for batch in _packed([len(pair) for pair in pairs], self._rank_window(), RANK_SEQUENCES):
            scores += await jobs.call(functools.partial(self._score, [pairs[i] for i in batch]))
        return Scores(scores=scores, prompt_tokens=sum(len(pair) for pair in pairs))

    def _rank_pairs(self, query: str, documents: list[str]) -> list[list[int]]:
        """On a prompt thread: each pair's tokens (see `_load_reranker`); a pair longer than the window is refused."""
        window = self._rank_window()
        before, between, after = self._pair_marks
        asked = before + self._encode(query, add_special=False, parse_special=False, window=window, param="query")
        pairs = []
        for index, document in enumerate(documents):
            text = self._encode(document, add_special=False, parse_special=False, window=window, param="documents")
            pairs.append(asked + between + text + after)
            if len(pairs[-1]) > window:
                raise pair_too_long(window, index, len(pairs[-1]))
        return pairs

    def _score(self, pairs: list[list[int]]) -> list[float]:
        """On the reranker's thread: the pairs in one encode, a sequence each. The rank pooling gives each pair's
        logit (what llama-server reports); its sigmoid is the relevance, as vLLM and transformers give it."""
        ctx, batch = self._rank_ctx, self._rank_batch
        batch.clear()
        for sequence, tokens in enumerate(pairs):
            batch.add(tokens, 0, sequence, outputs=len(tokens))
        if llama_cpp.llama_encode(ctx, batch.native) != 0:
            raise RuntimeError("llama_encode failed while reranking")
        logits = [llama_cpp.llama_get_embeddings_seq(ctx, sequence)[0] for sequence in range(len(pairs))]
        return [0.5 * (1 + math.tanh(logit / 2)) for logit in logits]  # the sigmoid, for any logit


def _packed(lengths: list[int], most_tokens: int, most_items: int) -> list[list[int]]:
    """The indices of `lengths` in order, in runs of at most `most_items` that add up to at most `most_tokens`."""
    batches: list[list[int]] = []
    total = 0
    for index, length in enumerate(lengths):
        if batches and len(batches[-1]) < most_items and total + length <= most_tokens:
            batches[-1].append(index)
            total += length
        else:
            batches.append([index])
            total = length
    return batches


def _without_pooler(path: str) -> bool:
    """A BERT classifier GGUF whose head is the output projection alone: llama.cpp's converter drops BERT's pooler
    (dense and tanh, which would be the `cls` tensor), which BertForSequenceClassification applies first."""
    names = {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    return "cls.output.weight" in names and "cls.weight" not in names
