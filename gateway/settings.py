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
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    ctx: int = Field(4096, ge=16, description="context window of each request, in tokens")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    gpu_layers: int = Field(0, ge=-1, description="layers offloaded to the GPU (-1: all)")
    parallel: int = Field(4, ge=1, description="sequences decoded together (batching slots)")
    batch_size: int = Field(512, ge=1, description="tokens per decode step (prompt chunking)")
    max_queue: int = Field(256, ge=0, description="requests that may wait for a slot before 503")
    embedding: bool = Field(True, description="serve /v1/embeddings from the chat model")
    config: Path | None = Field(None, description="YAML file of targets, model names, retries and keys (see README)")
    fallback_base_url: str | None = Field(None, description="without a config file: an OpenAI-compatible fallback")
    fallback_model: str | None = Field(None, description="the model name the fallback provider expects")
    fallback_api_key_env: str | None = Field(None, description="name of the env var holding the fallback's API key")
    request_timeout: float = Field(60, gt=0, description="default seconds a request may take before 504")
    max_request_timeout: float = Field(300, gt=0, description="the largest timeout a request may ask for")
    api_keys: str | None = Field(None, description="comma-separated keys clients must send (unset: open)")
    rate_limit_rpm: int | None = Field(None, ge=1, description="requests per minute per key from LLM_API_KEYS")
    rate_limit_tpm: int | None = Field(None, ge=1, description="tokens per minute per key from LLM_API_KEYS")
    http_client: str = Field("aiohttp", description="upstream HTTP client: aiohttp | httpx")
    unload_after_seconds: float = Field(300, ge=0, description="unload a model idle this long (0: never)")
    memory_budget_mb: int | None = Field(None, ge=1, description="RAM for models without CUDA (default: 80 percent)")
    load_wait_seconds: float = Field(60, ge=0, description="how long a request waits for its model to load before 503")
    model_url: str | None = Field(None, description="download the model file from this URL when it is not cached")
    model_checksum: str | None = Field(None, description="sha256:<hex> the model file must match")
    download_timeout: float = Field(30, gt=0, description="seconds to connect, and at most between two chunks")
    download_retries: int = Field(3, ge=0, description="retries of a failed download")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
