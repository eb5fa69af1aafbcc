"""Settings from the environment (LLM_*), with the names operators know from llama.cpp deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_", env_file=None, extra="ignore")

    engine: str = Field("llamacpp", description="engine name: llamacpp | transformers | vllm")
    model: str = Field("smollm2-135m-instruct", description="model path, or a name from configs/models.yaml")
    served_model_name: str | None = Field(None, description="public model id (default: the registry name or file stem)")
    models_dir: Path = Field(PROJECT_ROOT / "models", description="where model files are stored")
    registry: Path = Field(PROJECT_ROOT / "configs" / "models.yaml", description="the model registry file")
    data_dir: Path = Field(
        PROJECT_ROOT / "data", description="what the gateway keeps across restarts: the Responses API's stored "
        "responses (responses.sqlite3)"
    )
    responses_max_stored: int = Field(
        10_000, ge=1, description="stored responses kept (of all keys); past it the oldest are dropped"
    )
    responses_max_age_days: float = Field(30, gt=0, description="days a stored response is kept (OpenAI's 30)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    max_header_bytes: int = Field(
        65536, ge=1024, description="bytes a request's line and header fields may take before 431"
    )
    max_headers: int = Field(100, ge=1, description="header fields a request may carry before 431")
    header_timeout: float = Field(
        20, gt=0, description="seconds a client has to send a request head (from connecting, or from the first "
        "byte of a later request on the connection) before 408 and close"
    )
    body_timeout: float = Field(
        20, gt=0, description="the longest pause, in seconds, while a request body is sent before the connection closes"
    )
    keepalive_timeout: float = Field(20, gt=0, description="seconds an idle kept-alive connection stays open")
    max_connections: int = Field(
        512, ge=1, description="open client connections; a request on one beyond it gets 503"
    )
    ctx: int = Field(4096, ge=16, description="context window of each request, in tokens")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    gpu_layers: int = Field(0, ge=-1, description="layers offloaded to the GPU (-1: all)")
    parallel: int = Field(4, ge=1, description="sequences decoded together (batching slots)")
    batch_size: int = Field(512, ge=1, description="tokens per decode step (prompt chunking)")
    max_queue: int = Field(256, ge=0, description="requests that may wait for a slot before 503")
    # What one request may hold (400 naming the parameter past a limit; 413 for the body as a whole).
    max_body_bytes: int = Field(
        8 << 20, ge=1024, description="bytes of a request body before 413 (room for base64 images sent to providers)"
    )
    max_json_values: int = Field(
        500_000, ge=16, description="JSON values in a request body before 413, by its commas and brackets (parse time)"
    )
    max_messages: int = Field(
        2048, ge=1, description="messages in a chat request; also content parts or tool calls in one message"
    )
    max_prompt_chars: int = Field(
        2_000_000, ge=1, description="characters of text in a request's messages, prompts, embedding inputs or "
        "rerank pairs (the query counted once per document)"
    )
    max_logit_bias: int = Field(300, ge=0, description="logit_bias entries in a request (OpenAI's limit)")
    max_choices: int = Field(
        128, ge=1, description="sequences one request generates: n, times the prompts of a /v1/completions request"
    )
    max_embedding_inputs: int = Field(2048, ge=1, description="inputs of one /v1/embeddings request (OpenAI's limit)")
    max_rerank_documents: int = Field(
        1000, ge=1, description="documents of one /v1/rerank request (Cohere's recommended limit)"
    )
    max_input_tokens: int = Field(
        300_000, ge=1, description="token ids in a request's prompts or embedding inputs (OpenAI's embeddings limit)"
    )
    max_stop_chars: int = Field(1000, ge=1, description="characters of each stop sequence")
    embedding: bool = Field(True, description="serve /v1/embeddings from the chat model")
    config: Path | None = Field(
        None, description="YAML file of targets, model names, retries and keys (docs/configuration.md)"
    )
    fallback_base_url: str | None = Field(None, description="without a config file: an OpenAI-compatible fallback")
    fallback_model: str | None = Field(None, description="the model name the fallback provider expects")
    fallback_api_key_env: str | None = Field(None, description="name of the env var holding the fallback's API key")
    request_timeout: float = Field(60, gt=0, description="default seconds a request may take before 504")
    max_request_timeout: float = Field(300, gt=0, description="the largest timeout a request may ask for")
    api_keys: str | None = Field(None, description="comma-separated keys clients must send (unset: open)")
    admin_keys: str | None = Field(
        None, description="comma-separated keys that may also load and unload models and see target URLs in /health"
    )
    rate_limit_rpm: int | None = Field(None, ge=1, description="requests per minute per key from LLM_API_KEYS")
    rate_limit_tpm: int | None = Field(None, ge=1, description="tokens per minute per key from LLM_API_KEYS")
    redis_url: str | None = Field(
        None, pattern=r"^(redis|rediss|unix)://", max_length=2048,
        description="a Redis server the gateway's replicas share (redis://host:port/db; rediss:// for TLS): "
        "per-key rate limits, target cooldowns and stored responses live there (unset: in each process)"
    )
    redis_timeout: float = Field(
        0.25, gt=0, le=10, description="seconds one Redis call may take; past it, or on an error, Redis counts as "
        "unreachable and each replica uses its own state until Redis answers again (probed every second)"
    )
    redis_fail_open: bool = Field(
        False, description="rate limits while Redis is unreachable: false enforces each key's limits from each "
        "replica's own count (N replicas may admit up to N times a limit, never more); true enforces none until "
        "Redis answers again. Cooldowns and stored responses fall back to each replica's own either way"
    )
    http_client: str = Field("http1", description="upstream HTTP client: http1 | aiohttp | httpx")
    upstream_max_body_bytes: int = Field(
        32 << 20, ge=1024, description="bytes of a provider's answer read whole (a body, not a stream) before 502"
    )
    upstream_max_line_bytes: int = Field(
        1 << 20, ge=1024, description="bytes of one line of a provider's stream (an SSE event) before 502"
    )
    unload_after_seconds: float = Field(300, ge=0, description="unload a model idle this long (0: never)")
    memory_budget_mb: int | None = Field(
        None, ge=1, description="memory for models: RAM without CUDA (default: 80 percent); on CUDA a cap below the "
        "GPU's memory (default: all of it)"
    )
    warm_pool_mb: int | None = Field(
        None, ge=0, description="host RAM for embedding models and rerankers moved off the GPU under memory pressure "
        "(default: 25 percent of RAM; 0: unload them instead; no effect without CUDA)"
    )
    load_wait_seconds: float = Field(60, ge=0, description="how long a request waits for its model to load before 503")
    stall_after: float = Field(
        120, gt=0, description="seconds one engine step may run before /health and /ready report the model stalled"
    )
    model_url: str | None = Field(None, description="download the model file from this URL when it is not cached")
    model_checksum: str | None = Field(None, description="sha256:<hex> the model file must match")
    download_timeout: float = Field(30, gt=0, description="seconds to connect, and at most between two chunks")
    download_retries: int = Field(3, ge=0, description="retries of a failed download")
    embedding_model: str | None = Field(
        None, description="an embedding model served beside the chat model, by its name "
        "(default: all-minilm-l6-v2 for transformers and vllm, none for llamacpp; 'none' for none)"
    )
    quantization: str | None = Field(
        None, description="transformers: float16|bfloat16|int8|int4; vllm: awq, fp8, ... (default: the model's own)"
    )
    dtype: str = Field("auto", description="vllm: weights and activations dtype (auto, bfloat16, float16, ...)")
    trust_remote_code: bool = Field(False, description="transformers and vllm: run code shipped with the model")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory it may take")
    max_model_len: int | None = Field(None, ge=16, description="vllm: context length (default: LLM_CTX)")
    max_num_seqs: int | None = Field(None, ge=1, description="vllm: sequences per batch (default: LLM_PARALLEL)")
    kv_cache_dtype: str = Field("auto", description="vllm: KV cache dtype (auto, fp8, ...)")
    enable_prefix_caching: bool | None = Field(None, description="llamacpp, vllm: reuse KV cache of shared prefixes")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs a model is split over")
    data_parallel_size: int | None = Field(
        None, ge=1, le=64, description="vllm: replicas of the model (engine cores), each on its own GPUs (unset: 1)"
    )
    pipeline_parallel_size: int | None = Field(
        None, ge=1, le=64, description="vllm: stages a model's layers are split into, e.g. one a node (unset: 1)"
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vllm: where a model's GPU workers run: mp (this node) | ray (a Ray cluster; unset: vLLM's)"
    )
    enforce_eager: bool = Field(False, description="vllm: no CUDA graphs (faster start, slower decode)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
