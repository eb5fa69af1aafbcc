"""The governor's pure decisions: pressure levels, idle unloading by level, least-recently-used victims."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.models.governor import MB, InsufficientMemory, MemoryGovernor, pressure_level


@dataclass
class Model:
    served_name: str
    size: int
    idle: float
    serving: bool = False

    def footprint(self) -> int:
        return self.size

    def evictable(self) -> bool:
        return not self.serving

    def idle_seconds(self) -> float:
        return self.idle

    def last_used(self) -> float:
        return -self.idle


@pytest.mark.parametrize(
    "used, level", [(59, "none"), (60, "none"), (61, "moderate"), (80, "moderate"), (81, "high"), (91, "critical")]
)
def test_pressure_levels(used, level):
    assert pressure_level(used, 100).name == level


@pytest.mark.parametrize(
    "sizes, idle, unloaded",
    [
        ((30, 20), 150, []),  # 50 %: no pressure, and LLM_UNLOAD_AFTER_SECONDS is 300
        ((40, 30), 150, ["a"]),  # 70 %, moderate: idle > 120 s goes, until the level drops
        ((40, 30), 100, []),  # moderate, but neither idled 120 s
        ((50, 35), 40, ["a"]),  # 85 %, high: idle > 30 s
        ((50, 45), 6, ["a"]),  # 95 %, critical: idle > 5 s (a is the least recently used)
        ((50, 45), 4, []),  # critical, but inside the 5 s grace
    ],
)
def test_idle_unloading_by_pressure(sizes, idle, unloaded):
    models = [Model("a", sizes[0] * MB, idle + 1), Model("b", sizes[1] * MB, idle)]
    victims = MemoryGovernor(100 * MB, "cpu").idle_victims(models, unload_after=300)
    assert [m.served_name for m, _ in victims] == unloaded


def test_idle_timeout_without_pressure():
    models = [Model("a", 10 * MB, 301), Model("b", 10 * MB, 299), Model("c", 10 * MB, 400, serving=True)]
    victims = MemoryGovernor(100 * MB, "cpu").idle_victims(models, unload_after=300)
    assert [(m.served_name, reason) for m, reason in victims] == [("a", "idle")]
    assert MemoryGovernor(100 * MB, "cpu").idle_victims(models, unload_after=0) == []  # 0: never


def test_room_is_made_from_the_least_recently_used_idle_models():
    models = [Model("old", 30 * MB, 50), Model("busy", 30 * MB, 90, serving=True), Model("new", 30 * MB, 10)]
    governor = MemoryGovernor(100 * MB, "cpu")
    assert governor.victims_for(20 * MB, models, str) == [models[0]]
    assert governor.victims_for(60 * MB, models, str) == [models[0], models[2]]
    with pytest.raises(InsufficientMemory) as raised:
        governor.victims_for(80 * MB, models, lambda free: f"{free // MB} MB free")
    assert "busy" in raised.value.message and "10 MB short" in raised.value.message
    assert raised.value.status_code == 507
