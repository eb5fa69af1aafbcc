"""The governor's pure decisions: pressure levels, idle unloading by level, least-recently-used victims across model
kinds, and the warm pool (on a GPU an embedding model or reranker leaving moves to host RAM; a chat model unloads)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.models.governor import MB, InsufficientMemory, MemoryGovernor, pressure_level

GPU = "cuda (test)"


@dataclass(eq=False)
class Model:
    served_name: str
    size: int
    idle: float
    serving: bool = False
    kind: str = "chat"
    warm: bool = False  # in the warm pool: `size` counts there, not on the budget's device

    def footprint(self) -> int:
        return 0 if self.warm else self.size

    def warm_bytes(self) -> int:
        return self.size if self.warm else 0

    def evictable(self) -> bool:
        return not self.serving

    def idle_seconds(self) -> float:
        return self.idle

    def last_used(self) -> float:
        return -self.idle


def plan(evictions) -> list[tuple[str, str, str]]:
    return [(e.model.served_name, e.reason, "offload" if e.offload else "unload") for e in evictions]


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
    assert [e.model.served_name for e in victims] == unloaded


def test_idle_timeout_without_pressure():
    models = [Model("a", 10 * MB, 301), Model("b", 10 * MB, 299), Model("c", 10 * MB, 400, serving=True)]
    victims = MemoryGovernor(100 * MB, "cpu").idle_victims(models, unload_after=300)
    assert plan(victims) == [("a", "idle", "unload")]
    assert MemoryGovernor(100 * MB, "cpu").idle_victims(models, unload_after=0) == []  # 0: never


def test_room_is_made_from_the_least_recently_used_idle_models():
    models = [Model("old", 30 * MB, 50), Model("busy", 30 * MB, 90, serving=True), Model("new", 30 * MB, 10)]
    governor = MemoryGovernor(100 * MB, "cpu")
    assert [e.model for e in governor.victims_for(20 * MB, models, str)] == [models[0]]
    assert [e.model for e in governor.victims_for(60 * MB, models, str)] == [models[0], models[2]]
    with pytest.raises(InsufficientMemory) as raised:
        governor.victims_for(80 * MB, models, lambda free: f"{free // MB} MB free")
    assert "busy" in raised.value.message and "10 MB short" in raised.value.message
    assert raised.value.status_code == 507


def test_one_lru_over_every_kind_and_the_gpu_moves_embedding_models_and_rerankers_to_the_warm_pool():
    models = [Model("embed", 20 * MB, 50, kind="embedding"), Model("chat", 30 * MB, 40),
              Model("rerank", 10 * MB, 30, kind="rerank"), Model("chat-new", 30 * MB, 1)]  # fmt: skip
    governor = MemoryGovernor(100 * MB, GPU, warm_budget_bytes=50 * MB)
    assert plan(governor.victims_for(45 * MB, models, str)) == [("embed", "memory", "offload"),
                                                                 ("chat", "memory", "unload")]  # fmt: skip
    assert plan(governor.victims_for(65 * MB, models, str)) == [
        ("embed", "memory", "offload"), ("chat", "memory", "unload"), ("rerank", "memory", "offload"),
    ]  # fmt: skip
    models[0].warm = True  # in the pool now: 0 on the GPU, so the next room comes from the GPU's models
    assert plan(governor.victims_for(40 * MB, models, str)) == [("chat", "memory", "unload")]
    state = governor.state(models)
    assert (state["used_bytes"], state["warm_pool"]) == (
        70 * MB, {"budget_bytes": 50 * MB, "used_bytes": 20 * MB, "models": {"embed": 20 * MB}}
    )  # fmt: skip


def test_on_a_cpu_the_warm_pool_is_off_and_every_kind_is_unloaded():
    models = [Model("embed", 20 * MB, 50, kind="embedding"), Model("rerank", 10 * MB, 40, kind="rerank")]
    governor = MemoryGovernor(100 * MB, "cpu", warm_budget_bytes=50 * MB)
    assert governor.warm_budget == 0
    assert plan(governor.victims_for(95 * MB, models, str)) == [("embed", "memory", "unload"),
                                                                 ("rerank", "memory", "unload")]  # fmt: skip


def test_a_warm_pool_over_its_budget_unloads_its_least_recently_used_member():
    older = Model("older", 20 * MB, 100, kind="embedding", warm=True)
    newer = Model("newer", 20 * MB, 60, kind="rerank", warm=True)
    leaving = Model("leaving", 20 * MB, 80, kind="embedding")
    chat = Model("chat", 70 * MB, 1, serving=True)
    governor = MemoryGovernor(100 * MB, GPU, warm_budget_bytes=45 * MB)
    # 20 + 20 + 20 MB would be in a 45 MB pool: the least recently used member leaves first, to free host RAM.
    assert plan(governor.victims_for(20 * MB, [older, newer, leaving, chat], str)) == [
        ("older", "warm_pool", "unload"), ("leaving", "memory", "offload"),
    ]  # fmt: skip
    # A model leaving the GPU that is older than every member is unloaded at once instead of moving in.
    leaving.idle = 200
    assert plan(governor.victims_for(20 * MB, [older, newer, leaving, chat], str)) == [("leaving", "memory", "unload")]
    # One larger than the whole pool never moves in.
    assert plan(MemoryGovernor(100 * MB, GPU, 15 * MB).victims_for(20 * MB, [leaving, chat], str)) == [
        ("leaving", "memory", "unload"),
    ]  # fmt: skip


def test_pressure_moves_an_idle_embedding_model_to_the_pool_and_the_idle_timeout_unloads_it_there():
    embed = Model("embed", 20 * MB, 40, kind="embedding")
    chat = Model("chat", 70 * MB, 35)
    governor = MemoryGovernor(100 * MB, GPU, warm_budget_bytes=50 * MB)
    # 90 %, high: both idled over 30 s; the embedding model's move brings the level down to moderate.
    assert plan(governor.idle_victims([embed, chat], unload_after=300)) == [("embed", "pressure_high", "offload")]
    embed.warm, embed.idle = True, 301
    assert plan(governor.idle_victims([embed, chat], unload_after=300)) == [("embed", "idle", "unload")]
    embed.idle = 299  # in the pool the GPU's pressure does not reach it
    assert governor.idle_victims([embed, Model("chat", 95 * MB, 10, serving=True)], unload_after=300) == []


def test_nothing_to_free_gets_507_naming_the_busy_model():
    models = [Model("chat", 70 * MB, 1, serving=True), Model("embed", 20 * MB, 9, kind="embedding", warm=True)]
    with pytest.raises(InsufficientMemory) as raised:
        MemoryGovernor(100 * MB, GPU, 50 * MB).victims_for(40 * MB, models, lambda free: "")
    assert "(chat)" in raised.value.message and "10 MB short" in raised.value.message
