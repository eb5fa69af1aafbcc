"""The memory governor: one budget shared by every local model of every kind (chat, embedding, rerank), one
least-recently-used order over them, and who must leave to make room.

The budget is the GPU's memory when models run on CUDA (at most `LLM_MEMORY_BUDGET_MB`), else
`LLM_MEMORY_BUDGET_MB` of RAM (default 80 % of the machine's). A model on the budget's device counts with its
real footprint (what its engine reports); a model about to load counts with its estimate (the registry's size
for its quantization, else the size of its weight files). Pressure is used / budget; each level frees models
idle for longer than its threshold:

    below 60 %  none          60-80 %  moderate: idle > 120 s
    80-90 %     high: > 30 s  over 90 %  critical: idle > 5 s (a grace period, then forced)

A model leaving the GPU is unloaded, except an embedding model or reranker while the warm pool has room: that
one moves to host RAM (the warm pool, with a budget of its own, `LLM_WARM_POOL_MB`) and back to the GPU on its
next request, in a fraction of a load's time. It counts 0 against the GPU budget there and its bytes against
the pool's; when the pool would exceed its budget, its least recently used members are unloaded. On a CPU the
pool is off (moving weights from RAM to RAM frees nothing): every model leaving is unloaded. The idle timeout
(`LLM_UNLOAD_AFTER_SECONDS`) unloads a model wherever it is, on the GPU or in the pool.

A model serving a request (from its first engine call to its last), loading, or read by a thread that a
cancelled request left running never leaves. Making room for a model frees the least recently used idle
models; if that cannot free enough, the request gets 507 naming the shortfall.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Protocol

from engines.base import EngineOverloaded
from gateway.models import devices
from gateway.settings import Settings

MB = 1 << 20
# The kinds of model the warm pool takes: small, and wanted back fast by the next RAG request.
WARM_KINDS = frozenset({"embedding", "rerank"})
WARM_POOL_SHARE_OF_RAM = 0.25  # the warm pool's budget without LLM_WARM_POOL_MB
RAM_BUDGET_SHARE = 0.8  # the budget on a CPU without LLM_MEMORY_BUDGET_MB


@dataclass(frozen=True)
class PressureLevel:
    name: str
    above: float  # ratio of the budget in use
    idle_seconds: float | None  # free models idle longer than this; None: leave them


# Highest first: the first level whose threshold the ratio exceeds applies.
LEVELS = (
    PressureLevel("critical", 0.90, 5.0),
    PressureLevel("high", 0.80, 30.0),
    PressureLevel("moderate", 0.60, 120.0),
    PressureLevel("none", 0.0, None),
)


class Resident(Protocol):
    """What the governor needs to know of a model (gateway.models.lifecycle.ManagedModel)."""

    served_name: str
    kind: str  # "chat", "embedding" or "rerank"

    def footprint(self) -> int: ...  # bytes held on the budget's device now (0 when unloaded or in the warm pool)

    def warm_bytes(self) -> int: ...  # bytes held in the warm pool now (0 unless there)

    def evictable(self) -> bool: ...  # loaded or warm, serving nothing, not loading, no thread still reading it

    def idle_seconds(self) -> float: ...

    def last_used(self) -> float: ...


@dataclass(frozen=True)
class Eviction:
    """A model to free: moved to the warm pool (`offload`), else unloaded; `reason` goes into the metrics."""

    model: Resident
    reason: str  # "memory", "idle", "pressure_<level>", "warm_pool" (the pool was over its budget)
    offload: bool = False


def pressure_level(used: int, budget: int) -> PressureLevel:
    ratio = used / budget if budget else 1.0
    return next(level for level in LEVELS if ratio > level.above or level.above == 0.0)


class MemoryGovernor:
    def __init__(self, budget_bytes: int, device: str, warm_budget_bytes: int = 0):
        self.budget = budget_bytes
        self.device = device
        self.warm_budget = 0 if device == "cpu" else warm_budget_bytes  # see the module's docstring

    def used(self, models: Iterable[Resident]) -> int:
        return sum(m.footprint() for m in models)

    def warm_used(self, models: Iterable[Resident]) -> int:
        return sum(m.warm_bytes() for m in models)

    def state(self, models: list[Resident]) -> dict:
        used = self.used(models)
        return {
            "device": self.device,
            "budget_bytes": self.budget,
            "used_bytes": used,
            "pressure": pressure_level(used, self.budget).name,
            "models": {m.served_name: m.footprint() for m in models if m.footprint()},
            "warm_pool": {
                "budget_bytes": self.warm_budget,
                "used_bytes": self.warm_used(models),
                "models": {m.served_name: m.warm_bytes() for m in models if m.warm_bytes()},
            },
        }

    def victims_for(self, needed: int, models: list[Resident], suggest: Callable[[int], str]) -> list[Eviction]:
        """The least recently used idle models to free so `needed` bytes fit; 507 if they cannot.

        `suggest(available_bytes)` names what would fit instead, for the 507's message."""
        if needed > self.budget:
            raise insufficient_memory(needed, self.budget, "the whole budget is smaller", suggest)
        free = self.budget - self.used(models)
        evictions: list[Eviction] = []
        for model in _least_recent_first(m for m in models if m.evictable() and m.footprint()):
            if free >= needed:
                break
            evictions.append(self._freeing(model, "memory"))
            free += model.footprint()
        if free < needed:
            busy = ", ".join(m.served_name for m in models if m.footprint() and not m.evictable())
            raise insufficient_memory(needed, free, f"models serving requests cannot be unloaded ({busy})", suggest)
        return self._within_warm_pool(models, evictions)

    def idle_victims(self, models: list[Resident], unload_after: float) -> list[Eviction]:
        """Idle models to free now: by LLM_UNLOAD_AFTER_SECONDS (unloaded, wherever they are), and on the GPU by
        the pressure level's threshold."""
        evictions: list[Eviction] = []
        used = self.used(models)
        for model in _least_recent_first(m for m in models if m.evictable()):
            level = pressure_level(used, self.budget)
            idle = model.idle_seconds()
            if unload_after > 0 and idle > unload_after:
                evictions.append(Eviction(model, "idle"))
            elif model.footprint() and level.idle_seconds is not None and idle > level.idle_seconds:
                evictions.append(self._freeing(model, f"pressure_{level.name}"))
            else:
                continue
            used -= model.footprint()
        return self._within_warm_pool(models, evictions)

    def _freeing(self, model: Resident, reason: str) -> Eviction:
        """A model leaving the GPU: to the warm pool when its kind goes there and it fits the pool at all."""
        warm = model.kind in WARM_KINDS and 0 < model.footprint() <= self.warm_budget
        return Eviction(model, reason, offload=warm)

    def _within_warm_pool(self, models: list[Resident], evictions: list[Eviction]) -> list[Eviction]:
        """`evictions`, and the warm pool kept within its budget: while the models moving in and those already
        there take more, the least recently used of them is unloaded (one moving in is unloaded instead). The
        members leaving come first, so host RAM is freed before it is filled."""
        leaving = {id(e.model) for e in evictions}
        incoming = {id(e.model): e for e in evictions if e.offload}
        staying = [m for m in models if id(m) not in leaving]
        used = self.warm_used(staying) + sum(e.model.footprint() for e in incoming.values())
        members = [m for m in staying if m.warm_bytes() and m.evictable()]
        departures: list[Eviction] = []
        for model in _least_recent_first([*members, *(e.model for e in incoming.values())]):
            if used <= self.warm_budget:
                break
            if id(model) in incoming:
                incoming[id(model)] = replace(incoming[id(model)], offload=False)
                used -= model.footprint()
            else:
                departures.append(Eviction(model, "warm_pool"))
                used -= model.warm_bytes()
        return departures + [incoming.get(id(e.model), e) for e in evictions]


def _least_recent_first(models: Iterable[Resident]) -> list[Resident]:
    return sorted(models, key=lambda m: m.last_used())


def memory_governor(settings: Settings) -> MemoryGovernor:
    """GPU memory when models run on CUDA (at most LLM_MEMORY_BUDGET_MB), else the RAM budget; and the warm
    pool's host RAM. llama.cpp runs on the GPU only with LLM_GPU_LAYERS set; transformers and vLLM wherever CUDA
    is."""
    on_cuda = settings.gpu_layers != 0 or settings.engine != "llamacpp"
    gpu = devices.gpu() if on_cuda else None
    ram = devices.ram_bytes()
    cap = settings.memory_budget_mb * MB if settings.memory_budget_mb else None
    warm = settings.warm_pool_mb * MB if settings.warm_pool_mb is not None else int(ram * WARM_POOL_SHARE_OF_RAM)
    if gpu is not None:
        return MemoryGovernor(min(gpu.total_bytes, cap or gpu.total_bytes), f"cuda ({gpu.name})", warm)
    return MemoryGovernor(cap or int(ram * RAM_BUDGET_SHARE), "cpu")


class InsufficientMemory(EngineOverloaded):
    """507: the model does not fit now. Like a full queue it is about capacity, not health: a fallback
    chain tries its next target without cooling this one down."""

    status_code = 507
    error_type = "insufficient_storage"
    code = "insufficient_memory"


def insufficient_memory(needed: int, available: int, why: str,
                        suggest: Callable[[int], str]) -> InsufficientMemory:  # fmt: skip
    shortfall = max(needed - available, 0)
    message = (
        f"Not enough memory to load this model: it needs about {needed / MB:.0f} MB, {available / MB:.0f} MB "
        f"can be made free ({why}); {shortfall / MB:.0f} MB short. {suggest(available)}"
    )
    return InsufficientMemory(message, param="model")
