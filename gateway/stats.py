"""Routing counters, kept here so the metrics exporter can read them without reaching into routing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RoutingStats:
    """Counts by target name: `served` successes, `retries` on the same target, `fallbacks` away from it."""

    served: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    exhausted: int = 0  # requests that no target could serve

    def snapshot(self) -> dict:
        return {
            "served": dict(self.served),
            "retries": dict(self.retries),
            "fallbacks": dict(self.fallbacks),
            "exhausted": self.exhausted,
        }
