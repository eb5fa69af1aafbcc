"""Which targets serve a request: the public model names clients send in `model` (names, aliases,
tiers), each mapped to an ordered chain of targets (local engines and remote providers)."""

from __future__ import annotations

from dataclasses import dataclass

from engines.base import Engine
from gateway.errors import model_not_found
from gateway.routing.targets import LocalTarget, RemoteTarget

Target = LocalTarget | RemoteTarget


@dataclass(frozen=True)
class Route:
    name: str
    targets: list[Target]
    continue_on_failure: bool = False  # a broken chat stream is finished by a later target (continuation.py)


class ModelRouter:
    def __init__(self, targets: dict[str, Target] | None = None, chains: dict[str, list[str]] | None = None,
                 continuing: set[str] = frozenset()):  # fmt: skip
        self._targets = targets or {}
        self._routes = {name: Route(name, [self._targets[t] for t in chain], name in continuing)
                        for name, chain in (chains or {}).items()}  # fmt: skip

    def resolve(self, model: str) -> Route:
        try:
            return self._routes[model]
        except KeyError:
            raise model_not_found(model) from None

    def names(self) -> list[str]:
        return list(self._routes)

    def targets(self) -> list[Target]:
        return list(self._targets.values())

    def readiness(self, model: str) -> str:
        """"ready" when the model can be served now: a remote target, or a local model that has loaded (if
        since unloaded for idleness, its next request loads it again), in its chain; otherwise the state of
        its first local model ("loading", "failed")."""
        states = [t.model.readiness() if isinstance(t, LocalTarget) else "ready" for t in self.resolve(model).targets]
        return "ready" if "ready" in states else states[0]

    def engines(self) -> list[Engine]:
        return [t.model for t in self._targets.values() if isinstance(t, LocalTarget)]
