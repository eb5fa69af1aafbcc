"""Rerank requests through chains: a provider that refuses connections falls back to the local reranker, a local
reranker that failed to load falls back to a remote one, and a remote rerank target that is another gateway process
(which serves /rerank under its base URL, as vLLM and llama-server do) answers through this one, its usage counted.

Two gateways on loopback, each with the tests' cross-encoder (tests/reranker_model.py) on the transformers engine:
`upstream_gateway` serves it alone; `routed` (with a key) has it beside the failing targets and the upstream.
"""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import ENGINES, Server, free_port, skip_unless_ci, start_server
from tests.reranker_model import direct_scores, hf_reranker
from tests.routing.test_routing import access_line, counter

KEY = "sk-rerank-key"
RERANKER = "tiny-reranker"
TRANSFORMERS = ENGINES["transformers"]
QUERY = "Where do llamas live?"
DOCUMENTS = [
    "The llama is a domesticated South American camelid.",
    "Stock markets fell sharply today.",
    "Guanacos live in the Andes, close relatives of the llama.",
]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    if reason := TRANSFORMERS.missing():
        skip_unless_ci(reason)
    return hf_reranker(tmp_path_factory.getbasetemp() / "reranker" / "hf")


def local_reranker(model) -> dict:
    return {"type": "local", "engine": "transformers", "model": str(model), "options": {"task": "rerank"}}


def gateway(folder, targets: dict, chains: dict, **config) -> Server:
    config = {"targets": targets, "models": {name: {"targets": chain} for name, chain in chains.items()}, **config}
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # the first model loads first
    return start_server(folder, {"LLM_CONFIG": str(folder / "gateway.yaml"), **TRANSFORMERS.env})


@pytest.fixture(scope="module")
def upstream_gateway(tmp_path_factory, reranker) -> Server:
    server = gateway(tmp_path_factory.mktemp("rerank-upstream"), {"reranker": local_reranker(reranker)},
                     {RERANKER: ["reranker"]})  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def routed(tmp_path_factory, reranker, upstream_gateway) -> Server:
    folder = tmp_path_factory.mktemp("rerank-routed")
    broken = folder / "broken-reranker"  # a model directory that transformers cannot load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    targets = {
        "local": local_reranker(reranker),
        "broken": local_reranker(broken),
        "refused": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "x"},
        "gateway-b": {"type": "openai", "base_url": upstream_gateway.v1, "model": RERANKER},
    }
    chains = {"refused-then-local": ["refused", "local"], "via-gateway": ["gateway-b"],
              "usage-via-gateway": ["gateway-b"], "broken-then-gateway": ["broken", "gateway-b"]}  # fmt: skip
    # The refused target never cools down, so every request falls back from it.
    server = gateway(folder, targets, chains, retry={"attempts": 1, "failures_to_cool": 1000},
                     api_keys=[{"key": KEY, "name": "tests"}])  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected(reranker) -> tuple[list[int], list[float]]:
    """The documents' order by the model run directly through transformers, and their scores in that order."""
    scores = direct_scores(reranker, QUERY, DOCUMENTS)
    return sorted(range(len(scores)), key=lambda i: -scores[i]), sorted(scores, reverse=True)


def rerank(server: Server, model: str, path: str = "/v1/rerank") -> tuple[str, dict]:
    body = {"model": model, "query": QUERY, "documents": DOCUMENTS}
    response = server.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    return response.headers["x-llm-target"], response.json()


def assert_ranked(answer: dict, expected: tuple[list[int], list[float]]) -> None:
    order, scores = expected
    assert [r["index"] for r in answer["results"]] == order
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx(scores, abs=1e-4)


def test_a_failing_provider_falls_back_to_the_local_reranker(routed, expected):
    fallbacks = counter(routed, "llm_fallbacks", from_target="refused", to_target="local")
    target, answer = rerank(routed, "refused-then-local")
    assert target == "local"
    assert_ranked(answer, expected)
    assert counter(routed, "llm_fallbacks", from_target="refused", to_target="local") == fallbacks + 1


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_another_gateway_serves_as_a_remote_reranker(routed, upstream_gateway, expected, path):
    target, answer = rerank(routed, "via-gateway", path)
    assert target == "gateway-b"
    assert answer["model"] == RERANKER  # as the upstream answered it, relayed unchanged
    assert_ranked(answer, expected)
    assert answer["usage"]["prompt_tokens"] > 0


def test_the_usage_a_remote_reranker_reports_is_counted(routed):
    _, answer = rerank(routed, "usage-via-gateway")  # its one request
    assert access_line(routed, "usage-via-gateway")["prompt_tokens"] == answer["usage"]["prompt_tokens"]


def test_a_local_reranker_that_failed_to_load_falls_back_to_the_remote(routed, expected):
    target, answer = rerank(routed, "broken-then-gateway")
    assert target == "gateway-b"
    assert_ranked(answer, expected)
    assert counter(routed, "llm_fallbacks", from_target="broken", to_target="gateway-b") >= 1


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_every_rerank_path_needs_a_key(routed, path):
    response = routed.post(path, json={"model": "refused-then-local", "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 401, response.text
