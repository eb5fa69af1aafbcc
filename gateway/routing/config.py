"""The routing config: targets (local engines, remote providers speaking OpenAI's or Anthropic's API), the public
model names mapped to ordered fallback chains, retry and cooldown policy, and client API keys.

It comes from the YAML file named by LLM_CONFIG, or, for the simple case, from LLM_* variables alone
(one local model, optionally one remote fallback). Secrets are never in the file: it names env vars.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.settings import Settings


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalTargetConfig(Strict):
    """A model served by an in-process engine; unset fields take the LLM_* settings."""

    type: Literal["local"]
    engine: str | None = None
    model: str | None = None  # a registry name or a file path
    context_length: int | None = Field(None, ge=16)
    threads: int | None = Field(None, ge=1)
    gpu_layers: int | None = Field(None, ge=-1)
    parallel: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    max_waiting: int | None = Field(None, ge=0)
    embedding: bool | None = None
    options: dict[str, Any] = Field(default_factory=dict)


def _http_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    # (Reading the port raises a ValueError for one out of range.)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:
        raise ValueError(f"a provider's URL must be an http:// or https:// URL, not {url!r}")
    return url


class EndpointConfig(Strict):
    """One server of a target's pool (docs/routing.md#engine-pools)."""

    url: str  # as a base_url
    weight: float = Field(1, gt=0, le=1000, description="its share of the pool's requests, against the others'")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        return _http_url(url)


class PoolPolicy(Strict):
    """How a target spreads its requests over its `endpoints`, and how it finds one down."""

    # Under each endpoint's URL ("models": {url}/models), or from its server's root ("/health").
    health_path: str = Field("/health", min_length=1, max_length=200, pattern=r"^\S+$")
    health_interval: float = Field(5, ge=0, le=3600, description="seconds between active checks; 0: none")
    health_timeout: float = Field(2, gt=0, le=60)
    eject_after: int = Field(3, ge=1, le=1000, description="consecutive failed requests that eject an endpoint")
    eject_seconds: float = Field(30, ge=0, le=3600)
    slow_return_seconds: float = Field(30, ge=0, le=3600, description="an endpoint back grows to its full share")
    prefix_bytes: int = Field(2048, ge=16, le=1_000_000, description="of each message the affinity digest reads")
    load_factor: float = Field(1.25, ge=1, le=100, description="affinity skips an endpoint past this times the mean")


class RemoteTargetConfig(Strict):
    """A provider's HTTP API: what every kind of remote target is configured with. One server (`base_url`), or a
    pool of servers of the same model (`endpoints`, spread as `balance` says): one of the two."""

    base_url: str | None = None
    endpoints: list[EndpointConfig] | None = Field(None, min_length=1, max_length=64)
    balance: Literal["affinity", "least_outstanding", "round_robin"] = "affinity"
    pool: PoolPolicy = Field(default_factory=PoolPolicy)
    model: str  # the name the provider expects
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    connect_timeout: float = Field(5, gt=0)
    read_timeout: float = Field(60, gt=0, description="longest wait for the first byte and between chunks")

    @field_validator("base_url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        return _http_url(url)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _plain_urls(cls, endpoints: Any) -> Any:
        """An endpoint written as its URL alone weighs 1."""
        if isinstance(endpoints, list):
            return [{"url": entry} if isinstance(entry, str) else entry for entry in endpoints]
        return endpoints

    @model_validator(mode="after")
    def _one_place(self):
        if self.endpoints is None:
            if self.base_url is None:
                raise ValueError("a remote target needs a base_url (or endpoints)")
            if {"balance", "pool"} & self.model_fields_set:
                raise ValueError("balance and pool apply to a target with endpoints, not to one base_url")
        elif "base_url" in self.model_fields_set:
            raise ValueError("a remote target has a base_url or endpoints, not both")
        else:
            self.base_url = None  # a default one (Anthropic's) gives way to the pool
        return self

    @field_validator("headers")
    @classmethod
    def _one_line_each(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            _one_line(f"header {name!r}", name + value)
        return headers

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            where = self.base_url or self.endpoints[0].url
            raise ValueError(f"environment variable {self.api_key_env} (api_key_env of {where}) is not set")
        return _one_line(f"environment variable {self.api_key_env}", key)


class OpenAITargetConfig(RemoteTargetConfig):
    """An OpenAI-compatible HTTP endpoint: OpenAI, Together, Cerebras, vLLM, llama-server, a gateway."""

    type: Literal["openai"]
    # Whether the provider serves /responses: then a Responses request goes to it as the client sent it.
    responses_api: bool = False
    # Whether it continues a last assistant message given vLLM's `continue_final_message` (vLLM, llama-server, this
    # gateway): then it may finish a stream that broke on another target (`continue_on_failure`).
    continue_final_message: bool = False


class AnthropicTargetConfig(RemoteTargetConfig):
    """Anthropic's Messages API (or one that speaks it): `base_url` is the API's root, as ANTHROPIC_BASE_URL."""

    type: Literal["anthropic"]
    base_url: str | None = "https://api.anthropic.com"


def _one_line(what: str, text: str) -> str:
    """What goes into a request's head: a line break would end the header early (or forge another)."""
    if "\r" in text or "\n" in text:
        raise ValueError(f"{what} holds a line break")
    return text


TargetConfig = Annotated[LocalTargetConfig | OpenAITargetConfig | AnthropicTargetConfig, Field(discriminator="type")]


class PublicModel(Strict):
    targets: list[str] = Field(..., min_length=1)
    aliases: list[str] = Field(default_factory=list)
    # A chat stream that breaks after output goes on from its text on the next target that can continue it.
    continue_on_failure: bool = False


class RetryPolicy(Strict):
    attempts: int = Field(2, ge=1, description="tries per target for transient failures")
    backoff_initial: float = Field(0.25, ge=0, description="first backoff in seconds, doubling, with full jitter")
    backoff_max: float = Field(4, ge=0)
    max_retry_after: float = Field(10, ge=0, description="a longer Retry-After moves on to the next target")
    failures_to_cool: int = Field(3, ge=1, description="consecutive failures that cool a target down")
    cooldown: float = Field(30, ge=0, description="seconds a cooled target is skipped")


class ApiKey(Strict):
    key: str | None = None
    key_env: str | None = None
    name: str | None = None  # what logs and /health call it, never the key itself
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    admin: bool = Field(False, description="may also load and unload models and see target URLs in /health")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.key is None) == (self.key_env is None):
            raise ValueError("an api_keys entry needs exactly one of key or key_env")
        return self

    def secret(self) -> str:
        value = self.key if self.key is not None else os.environ.get(self.key_env or "")
        if not value:
            raise ValueError(f"environment variable {self.key_env} (an api_keys entry) is not set")
        return value


class GatewayConfig(Strict):
    targets: dict[str, TargetConfig]
    models: dict[str, PublicModel]
    tiers: dict[str, str] = Field(default_factory=dict, description="tier name -> public model name")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    api_keys: list[ApiKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self):
        for name, model in self.models.items():
            unknown = [t for t in model.targets if t not in self.targets]
            if unknown:
                raise ValueError(f"model {name!r} names unknown targets {unknown}")
        for tier, model in self.tiers.items():
            if model not in self.models:
                raise ValueError(f"tier {tier!r} names unknown model {model!r}")
        self.routes()  # duplicate names fail here, at start-up
        return self

    def continuing(self) -> set[str]:
        """The names (aliases and tiers too) whose broken streams are finished elsewhere (`continue_on_failure`)."""
        models = {name for name, model in self.models.items() if model.continue_on_failure}
        names = {name for model in models for name in [model, *self.models[model].aliases]}
        return names | {tier for tier, model in self.tiers.items() if model in models}

    def routes(self) -> dict[str, list[str]]:
        """Every name a client may send (names, aliases, tiers) -> its chain of target names."""
        routes: dict[str, list[str]] = {}

        def add(name: str, chain: list[str]) -> None:
            if name in routes:
                raise ValueError(f"the public name {name!r} is defined twice")
            routes[name] = chain

        for name, model in self.models.items():
            add(name, model.targets)
            for alias in model.aliases:
                add(alias, model.targets)
        for tier, model in self.tiers.items():
            add(tier, self.models[model].targets)
        return routes


def load_config(path: Path) -> GatewayConfig:
    return GatewayConfig.model_validate(yaml.safe_load(Path(path).read_text()))


def simple_config(settings: Settings, served_name: str, embedding_model: str | None = None) -> GatewayConfig:
    """Without LLM_CONFIG: the local model named `served_name`, then LLM_FALLBACK_BASE_URL if set; and
    the engine's embedding model under its own name, when it has one."""
    targets: dict[str, Any] = {"local": {"type": "local"}}
    if settings.fallback_base_url:
        targets["fallback"] = {
            "type": "openai", "base_url": settings.fallback_base_url,
            "model": settings.fallback_model or served_name, "api_key_env": settings.fallback_api_key_env,
        }  # fmt: skip
    models = {served_name: {"targets": list(targets)}}
    if embedding_model:
        # A small encoder on one GPU: the chat model's parallel layout (LLM_*_PARALLEL_SIZE) is not its own.
        alone = {"tensor_parallel_size": 1, "data_parallel_size": 1, "pipeline_parallel_size": 1}
        targets["embedding"] = {"type": "local", "model": embedding_model, "options": {"task": "embed", **alone}}
        models[embedding_model] = {"targets": ["embedding"]}
    return GatewayConfig.model_validate({"targets": targets, "models": models})


def env_api_keys(settings: Settings) -> list[ApiKey]:
    """LLM_API_KEYS (with the LLM_RATE_LIMIT_* limits) and LLM_ADMIN_KEYS (admin keys, without limits)."""
    clients = [
        ApiKey(key=k, name=f"env-{i}", requests_per_minute=settings.rate_limit_rpm,
               tokens_per_minute=settings.rate_limit_tpm)
        for i, k in enumerate(_listed(settings.api_keys))
    ]  # fmt: skip
    admins = [ApiKey(key=k, name=f"env-admin-{i}", admin=True) for i, k in enumerate(_listed(settings.admin_keys))]
    return clients + admins


def _listed(keys: str | None) -> list[str]:
    return [k.strip() for k in (keys or "").split(",") if k.strip()]
