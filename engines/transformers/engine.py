"""The transformers engine: any Hugging Face model (a directory, a repo id, or a GGUF file) in this process.

A chat model generates through the worker thread; an encoder model (task "embed") only embeds. Both
embed by mean-pooling the last hidden state and normalising, the sentence-transformers recipe.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator

import llguidance
import llguidance.hf
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from engines.base import Delta, Embeddings, EngineConfig, Prompt, SamplingParams, UnsupportedFeature
from engines.common import BaseEngine
from engines.hf_prompts import HFPrompts, longest_piece
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

    @property
    def _embeds_only(self) -> bool:
        return self.config.options.get("task") == "embed"

    # ---- lifecycle -------------------------------------------------------------------------

    def _load_blocking(self) -> None:
        path = Path(self.config.model_path)
        source, extra = pretrained_source(path)
        extra["trust_remote_code"] = bool(self.config.options.get("trust_remote_code"))
        self._tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        self._longest_piece = longest_piece(self._tokenizer)
        if not self._embeds_only and not self._tokenizer.chat_template:
            raise ValueError(f"{path} has no chat template: only instruction-tuned models can serve chat")
        model_class = AutoModel if self._embeds_only else AutoModelForCausalLM
        placement = {"device_map": self._device} if self._device == "cuda" else {}
        model = model_class.from_pretrained(source, **extra, **placement, **QUANTIZATIONS[self._quantization]())
        self._model = model.eval()
        if not self._embeds_only:
            eos = eos_ids(model, self._tokenizer)
            self._grammar_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=eos)
            self._specials = special_tokens(self._tokenizer)

    def _start(self) -> None:
        config = self.config
        self._worker = Worker(self._model, self._tokenizer, slots=config.parallel,
                              context_length=config.context_length, max_waiting=config.max_waiting)  # fmt: skip

    def _runner(self) -> Worker | None:
        return self._worker

    def _require_ready(self, generating: bool = True) -> Worker:
        worker = super()._require_ready()
        if generating and self._embeds_only:
            raise UnsupportedFeature(
                f"model {self.config.served_name!r} is an embedding model; use /v1/embeddings", param="model"
            )
        return worker

    async def close(self) -> None:
        await self._end_prompt_work()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop)
            self._worker = None
        self._model = None
        self._state = "closed"

    # ---- info ------------------------------------------------------------------------------

    def _device_type(self) -> str:
        return self._device

    def _embedding_dimensions(self) -> int | None:
        return self._model.config.hidden_size if self._model is not None else None

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
        worker = self._require_ready(generating=False)
        if not self._embeds_only and not self.config.embedding:
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
