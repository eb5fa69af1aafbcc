"""The transformers engine: any Hugging Face model (a directory, a repo id, or a GGUF file) in this process.

A chat model generates through the worker thread; an encoder model (task "embed") only embeds. Both
embed by mean-pooling the last hidden state and normalising, the sentence-transformers recipe. A cross-encoder
(task "rerank") only scores (query, document) pairs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import AsyncIterator

import llguidance
import llguidance.hf
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from engines.base import Delta, Embeddings, EngineConfig, Prompt, SamplingParams, Scores, UnsupportedFeature
from engines.common import BaseEngine
from engines.hf_prompts import HFPrompts, longest_piece, require_reranker
from engines.json_budget import TokenCloser, closing_plan
from engines.llguidance_grammars import json_matcher, marker_pieces, special_tokens, tool_call_matcher
from engines.transformers.sampling import TokenChooser
from engines.transformers.worker import Worker, eos_ids
from engines.worker_thread import deltas

log = logging.getLogger(__name__)


def _bitsandbytes(**options) -> dict:
    return {"quantization_config": BitsAndBytesConfig(**options)}


# LLM_QUANTIZATION → from_pretrained arguments; the bitsandbytes ones need CUDA.
QUANTIZATIONS = {
    None: lambda: {"dtype": "auto"},
    "float16": lambda: {"dtype": torch.float16},
    "bfloat16": lambda: {"dtype": torch.bfloat16},
    "int8": lambda: _bitsandbytes(load_in_8bit=True),
    "int4": lambda: _bitsandbytes(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
}
NEEDS_CUDA = {"int8", "int4"}
MODEL_CLASSES = {"generate": AutoModelForCausalLM, "embed": AutoModel, "rerank": AutoModelForSequenceClassification}
# A reranker's forward takes pairs of similar length together, up to this many (padded) tokens.
RERANK_BATCH_TOKENS = 8192
# One model load at a time in the process: from_pretrained swaps process-wide state while it runs (torch's default
# dtype, PreTrainedModel.tie_weights, torch.nn.init's functions) and puts back what it found, so two loads on two
# threads (a chat model and its embedding model) restore each other's: float32 layers in a bf16 model, or its tied
# lm_head left untied on the meta device (NaN logits).
LOADING = threading.Lock()


def pretrained_source(path: Path) -> tuple[str, dict]:
    """`from_pretrained` arguments for LLM_MODEL: a GGUF file is read by transformers itself (dequantised);
    anything else is a directory or repo id."""
    return (str(path.parent), {"gguf_file": path.name}) if path.suffix == ".gguf" else (str(path), {})


class TransformersEngine(HFPrompts, BaseEngine[Worker]):
    name = "transformers"

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._quantization = config.options.get("quantization")
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        # Configuration mistakes stop start-up here, before the server listens.
        if self._quantization not in QUANTIZATIONS:
            choices = ", ".join(q for q in QUANTIZATIONS if q)
            raise ValueError(
                f"LLM_QUANTIZATION={self._quantization!r} is not one the transformers engine knows ({choices})"
            )
        if self._quantization in NEEDS_CUDA and self._device != "cuda":
            raise ValueError(f"LLM_QUANTIZATION={self._quantization} needs bitsandbytes on a CUDA GPU; none is visible")
        self._model = None
        self._tokenizer = None
        self._longest_piece: int | None = None  # bytes one token covers at most, where known
        self._grammar_tokenizer = None
        self._specials: dict[str, int] = {}  # the text of each special token → its id
        self._worker: Worker | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def _load_blocking(self) -> None:
        path = Path(self.config.model_path)
        source, extra = pretrained_source(path)
        extra["trust_remote_code"] = bool(self.config.options.get("trust_remote_code"))
        self._tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        self._longest_piece = longest_piece(self._tokenizer)
        if self._task == "generate" and not self._tokenizer.chat_template:
            raise ValueError(f"{path} has no chat template: only instruction-tuned models can serve chat")
        if self._task == "rerank":
            require_reranker(str(path), AutoConfig.from_pretrained(source, **extra))
        placement = {"device_map": self._device} if self._device == "cuda" else {}
        with LOADING:
            model = MODEL_CLASSES[self._task].from_pretrained(
                source, **extra, **placement, **QUANTIZATIONS[self._quantization]()
            )  # fmt: skip
        self._model = model.eval()
        if self._task == "generate":
            eos = eos_ids(model, self._tokenizer)
            self._grammar_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=eos)
            self._specials = special_tokens(self._tokenizer)

    def _start(self) -> None:
        config = self.config
        self._worker = Worker(self._model, self._tokenizer, slots=config.parallel,
                              context_length=config.context_length, max_waiting=config.max_waiting)  # fmt: skip

    def _runner(self) -> Worker | None:
        return self._worker

    async def close(self) -> None:
        await self._end_prompt_work()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop)
            self._worker = None
        self._model = None
        self._state = "closed"

    async def offload(self) -> bool:
        """The weights to host RAM, on the worker thread between its steps (the governor calls this only while no
        request holds the model). Not from a CPU, nor bitsandbytes weights, which live on the GPU only."""
        if self._device != "cuda" or self._quantization in NEEDS_CUDA:
            return False
        await self._worker.call(lambda: self._move("cpu"))
        return True

    async def restore(self) -> None:
        await self._worker.call(lambda: self._move(self._device))

    def _move(self, device: str) -> None:
        """Moves the model in place (the worker holds the same module); the GPU blocks it left go back to the
        driver, so other processes and NVML see them free."""
        self._model.to(device)
        torch.cuda.empty_cache()

    # ---- info ------------------------------------------------------------------------------

    def _device_type(self) -> str:
        return self._device

    def _embedding_dimensions(self) -> int | None:
        return self._model.config.hidden_size if self._model is not None and self._task != "rerank" else None

    def _memory_bytes(self) -> int:
        return self._model.get_memory_footprint() if self._model is not None else 0

    def context_length(self) -> int:
        """Tokens a request may use: LLM_CTX, capped by the positions the model was trained on."""
        trained = getattr(self._model.config, "max_position_embeddings", None) if self._model is not None else None
        return min(self.config.context_length, trained or self.config.context_length)

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        worker = self._require_ready()
        chooser = await asyncio.to_thread(self._chooser, params)
        sequence = worker.submit(prompt.token_ids, params, chooser, shown=self._shown_specials(params))
        async for delta in deltas(sequence, worker):
            yield delta

    def _chooser(self, params: SamplingParams) -> TokenChooser:
        vocab = self._model.get_output_embeddings().weight.shape[0]
        eos = eos_ids(self._model, self._tokenizer)
        matcher = self._matcher(params)
        return TokenChooser(params, vocab, eos, matcher, self._model.device, self._closer(params, matcher))

    def _closer(self, params: SamplingParams, matcher: llguidance.LLMatcher | None) -> TokenCloser | None:
        """Closes a constrained JSON answer before its token budget runs out (engines/json_budget.py)."""
        plan = closing_plan(params) if matcher is not None else None
        if plan is None:
            return None
        tokenizer = self._grammar_tokenizer
        watch = plan.watch(lambda text: len(tokenizer.tokenize_str(text)))
        return TokenCloser(watch, tokenizer, lambda tokens: matcher.validate_tokens(tokens) == len(tokens))

    def _matcher(self, params: SamplingParams) -> llguidance.LLMatcher | None:
        """The grammar of the request's constraint (one at most), built here: it takes time that grows with it."""
        try:
            if params.json_schema is not None:
                return json_matcher(self._grammar_tokenizer, params.json_schema)
            if params.tool_calls is not None:
                return tool_call_matcher(self._grammar_tokenizer, params.tool_calls, self._specials)
        except ValueError as exc:
            param = "response_format" if params.json_schema is not None else "tools"
            raise UnsupportedFeature(str(exc), param=param) from None
        return None

    def _shown_specials(self, params: SamplingParams) -> frozenset[int]:
        """Special tokens in the tool-call markers: the output keeps them, where the gateway's parser finds them."""
        calls = params.tool_calls
        if calls is None:
            return frozenset()
        pieces = marker_pieces(calls.begin, self._specials) + marker_pieces(calls.end, self._specials)
        return frozenset(piece for piece in pieces if isinstance(piece, int))

    # ---- embeddings ------------------------------------------------------------------------

    async def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        worker = self._require_ready("embed")
        if self._task == "generate" and not self.config.embedding:
            raise UnsupportedFeature("embeddings are disabled for this model (LLM_EMBEDDING=false)", param="model")
        token_lists = await self._embedding_inputs(inputs, self.context_length())
        vectors = await worker.call_each(self._embed_one, token_lists)
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(t) for t in token_lists))

    @torch.inference_mode()
    def _embed_one(self, tokens: list[int]) -> list[float]:
        """Mean of the last hidden states, L2-normalised; runs on the worker thread."""
        output = self._model(input_ids=torch.tensor([tokens], device=self._model.device), output_hidden_states=True)
        pooled = output.hidden_states[-1][0].float().mean(dim=0)
        return torch.nn.functional.normalize(pooled, dim=0).tolist()

    # ---- reranking -------------------------------------------------------------------------

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        if self._task != "rerank":
            return await super().rerank(query, documents)
        worker = self._require_ready("rerank")
        pairs = await self._rerank_inputs(query, documents)
        lengths = [len(pair["input_ids"]) for pair in pairs]
        scores = [0.0] * len(pairs)
        for batch in length_batches(lengths, RERANK_BATCH_TOKENS):
            batch_scores = await worker.call(lambda batch=batch: self._score([pairs[i] for i in batch]))
            for index, score in zip(batch, batch_scores):
                scores[index] = score
        return Scores(scores=scores, prompt_tokens=sum(lengths))

    @torch.inference_mode()
    def _score(self, pairs: list[dict[str, list[int]]]) -> list[float]:
        """Each pair's relevance, the sigmoid of the classifier's one logit; runs on the worker thread."""
        batch = self._tokenizer.pad(pairs, return_tensors="pt").to(self._model.device)
        return torch.sigmoid(self._model(**batch).logits[:, 0].float()).tolist()


def length_batches(lengths: list[int], most_tokens: int) -> list[list[int]]:
    """The indices of `lengths` in batches of similar length, each at most `most_tokens` once padded to its longest
    (one item at least): little padding, and no forward larger than that."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and lengths[index] * (len(batches[-1]) + 1) <= most_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches
