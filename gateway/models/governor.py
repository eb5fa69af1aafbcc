"""The memory governor: one budget shared by every local model, and who must leave to make room.

The budget is the GPU's memory when models run on CUDA, else `LLM_MEMORY_BUDGET_MB` of RAM (default 80 %
of the machine's). A loaded model counts with its real footprint (what its engine reports); a model
about to load counts with its estimate (the registry's size for its quantization, else its file size).
Pressure is used / budget; each level unloads models idle for longer than its threshold:

    below 60 %  none          60-80 %  moderate: idle > 120 s
    80-90 %     high: > 30 s  over 90 %  critical: idle > 5 s (a grace period, then forced)

A model serving a request (from its first engine call to its last), loading, or read by a thread that a
cancelled request left running is never unloaded. Making room for a new model unloads the least
recently used idle models; if that cannot free enough, the request gets 507 naming the shortfall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from engines.base import EngineOverloaded

MB = 1 << 20


@dataclass(frozen=True)
class PressureLevel:
    name: str
    above: float  # ratio of the budget in use
    idle_seconds: float | None  # unload models idle longer than this; None: leave them


# Highest first: the first level whose threshold the ratio exceeds applies.
LEVELS = (
    PressureLevel("critical", 0.90, 5.0),
    PressureLevel("high", 0.80, 30.0),
    PressureLevel("moderate", 0.60, 120.0),
    PressureLevel("none", 0.0, None),
)


class Resident(Protocol):
    """What the governor needs to know of a model (gateway.lifecycle.ManagedModel)."""

    served_name: str

    def footprint(self) -> int: ...  # bytes held now (0 when unloaded)

    def evictable(self) -> bool: ...  # loaded, serving nothing, and no thread still reading it

    def idle_seconds(self) -> float: ...

    def last_used(self) -> float: ...


def pressure_level(used: int, budget: int) -> PressureLevel:
    ratio = used / budget if budget else 1.0
    return next(level for level in LEVELS if ratio > level.above or level.above == 0.0)


class MemoryGovernor:
    def __init__(self, budget_bytes: int, device: str):
        self.budget = budget_bytes
        self.device = device

    def used(self, models: Iterable[Resident]) -> int:
        return sum(m.footprint() for m in models)

    def state(self, models: list[Resident]) -> dict:
        used = self.used(models)
        return {
            "device": self.device,
            "budget_bytes": self.budget,
            "used_bytes": used,
            "pressure": pressure_level(used, self.budget).name,
            "models": {m.served_name: m.footprint() for m in models if m.footprint()},
        }

    def victims_for(self, needed: int, models: list[Resident], suggest: Callable[[int], str]) -> list[Resident]:
        """The least recently used idle models to unload so `needed` bytes fit; 507 if they cannot.

        `suggest(available_bytes)` names what would fit instead, for the 507's message."""
        if needed > self.budget:
            raise insufficient_memory(needed, self.budget, "the whole budget is smaller", suggest)
        free = self.budget - self.used(models)
        victims: list[Resident] = []
        for model in sorted((m for m in models if m.evictable()), key=lambda m: m.last_used()):
            if free >= needed:
                break
            victims.append(model)
            free += model.footprint()
        if free < needed:
            busy = ", ".join(m.served_name for m in models if m.footprint() and not m.evictable())
            raise insufficient_memory(needed, free, f"models serving requests cannot be unloaded ({busy})", suggest)
        return victims

    def idle_victims(self, models: list[Resident], unload_after: float) -> list[tuple[Resident, str]]:
        """Idle models to unload now: by LLM_UNLOAD_AFTER_SECONDS, and by the pressure level's threshold."""
        victims: list[tuple[Resident, str]] = []
        used = self.used(models)
        for model in sorted((m for m in models if m.evictable()), key=lambda m: m.last_used()):
            level = pressure_level(used, self.budget)
            idle = model.idle_seconds()
            if level.idle_seconds is not None and idle > level.idle_seconds:
                victims.append((model, f"pressure_{level.name}"))
                used -= model.footprint()
            elif unload_after > 0 and idle > unload_after:
                victims.append((model, "idle"))
                used -= model.footprint()
        return victims


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
