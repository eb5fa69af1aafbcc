"""POST /v1/rerank, /rerank and /v2/rerank on a real gateway, on every engine that runs a reranker: the tests'
cross-encoder (tests/reranker_model.py) scores as transformers scores it when run directly, results sorted with
`top_n` and `return_documents`, bad input gets a 400 naming the parameter, the reranker is a model like the others
(its kind in /v1/models and /health, loaded and unloaded on request), and Cohere's SDK and LangChain's CohereRerank
read the answers.
"""

from __future__ import annotations

from pathlib import Path

import cohere
import pytest
import yaml
from langchain_cohere import CohereRerank
from langchain_core.documents import Document

from tests.conftest import ENGINES, HTTP_TIMEOUT, SELECTED, Server, free_port, require, start_server, wait_for_state
from tests.reranker_model import direct_scores, gguf_reranker, hf_reranker, segment_a_reranker

RERANKER = "tiny-reranker"
CHAT = "chat"
REMOTE = "remote-only"
MAX_DOCUMENTS = 8  # LLM_MAX_RERANK_DOCUMENTS of the gateway under test
MAX_CHARS = 20_000  # its LLM_MAX_PROMPT_CHARS
QUERY = "Where do llamas live?"
DOCUMENTS = [
    "The llama is a domesticated South American camelid.",
    "Stock markets fell sharply today.",
    "Guanacos live in the Andes, close relatives of the llama.",
    "A recipe for lemon cake with three eggs.",
    "Quantum chromodynamics describes the strong interaction.",
]


def reranker_files(engine: str, folder: Path) -> tuple[Path, Path]:
    """What the engine serves, and the Hugging Face model `direct_scores` runs for the same scores: llama.cpp
    serves a GGUF converted from the copy whose segments agree (its BERT reads every token as segment A)."""
    if engine == "llamacpp":
        return gguf_reranker(folder), segment_a_reranker(hf_reranker(folder / "hf"))
    hf = hf_reranker(folder / "hf")
    return hf, hf


@pytest.fixture(scope="module", params=SELECTED)
def reranking(request, tmp_path_factory) -> tuple[Server, Path]:
    """A gateway whose first model is the reranker, beside a chat model and a name served by a provider only;
    and the reference model."""
    engine = ENGINES[request.param]
    require(engine)
    served, reference = reranker_files(engine.name, tmp_path_factory.getbasetemp() / "reranker")
    folder = tmp_path_factory.mktemp(f"rerank-{engine.name}")
    config = {
        "targets": {
            # In float32 on every engine, as the reference runs (vLLM's "auto" may compute in less).
            "reranker": {"type": "local", "model": str(served), "options": {"task": "rerank", "dtype": "float32"}},
            "chat": {"type": "local"},
            "refused": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "x"},
        },
        "models": {RERANKER: {"targets": ["reranker"]}, CHAT: {"targets": ["chat"]}, REMOTE: {"targets": ["refused"]}},
    }  # fmt: skip
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # the reranker loads first
    env = {"LLM_CONFIG": str(folder / "gateway.yaml"), "LLM_MAX_RERANK_DOCUMENTS": str(MAX_DOCUMENTS),
           "LLM_MAX_PROMPT_CHARS": str(MAX_CHARS)}  # fmt: skip
    server = start_server(folder, env, engine=engine)
    yield server, reference
    server.stop()


@pytest.fixture(scope="module")
def server(reranking) -> Server:
    return reranking[0]


@pytest.fixture(scope="module")
def expected(reranking) -> list[float]:
    """The reference scores of DOCUMENTS, far enough apart that their order is certain."""
    scores = direct_scores(reranking[1], QUERY, DOCUMENTS)
    ordered = sorted(scores)
    assert min(b - a for a, b in zip(ordered, ordered[1:])) > 1e-3, scores
    return scores


def rerank(server: Server, path: str = "/v1/rerank", **fields) -> dict:
    response = server.post(path, json={"model": RERANKER, "query": QUERY, "documents": DOCUMENTS, **fields})
    assert response.status_code == 200, response.text
    assert response.headers["x-llm-target"] == "reranker"
    return response.json()


def ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def test_scores_equal_the_model_run_directly(server, expected):
    answer = rerank(server)
    assert answer["model"] == RERANKER and answer["id"]
    results = answer["results"]
    assert [r["index"] for r in results] == ranking(expected)
    assert [r["relevance_score"] for r in results] == pytest.approx([expected[r["index"]] for r in results], abs=1e-4)
    assert [r["document"] for r in results] == [{"text": DOCUMENTS[r["index"]]} for r in results]  # vLLM's default
    usage = answer["usage"]
    # Every pair reads the query and a document: more tokens than all the words.
    assert usage["prompt_tokens"] == usage["total_tokens"] > len(" ".join([QUERY, *DOCUMENTS]).split())


@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
def test_top_n_of_documents_as_objects_without_their_text(server, expected, path):
    answer = rerank(server, path, documents=[{"text": text} for text in DOCUMENTS], top_n=2, return_documents=False)
    assert [r["index"] for r in answer["results"]] == ranking(expected)[:2]
    assert all("document" not in r for r in answer["results"])
    everything = rerank(server, path, top_n=len(DOCUMENTS) + 3)["results"]  # more than there are: all of them
    assert [r["index"] for r in everything] == ranking(expected)


@pytest.mark.parametrize("fields, param", [
    ({"documents": []}, "documents"),
    ({"documents": ["a"] * (MAX_DOCUMENTS + 1)}, "documents"),
    ({"query": ""}, "query"),
    ({"documents": ["a", ""]}, "documents[1]"),
    ({"documents": ["a", {"text": ""}]}, "documents[1].text"),
    ({"documents": [{"text": "a", "title": "b"}]}, "documents[0].title"),
    ({"top_n": 0}, "top_n"),
    ({"rank_fields": ["text"]}, "rank_fields"),
    # Short documents, but the query is read again with each one: past LLM_MAX_PROMPT_CHARS.
    ({"query": "q" * (MAX_CHARS // MAX_DOCUMENTS), "documents": ["a"] * MAX_DOCUMENTS}, "documents"),
    ({"max_tokens_per_doc": 16}, "max_tokens_per_doc"),  # providers truncate; local engines do not
])  # fmt: skip
def test_bad_input_gets_a_400_naming_the_parameter(server, fields, param):
    body = {"model": RERANKER, "query": QUERY, "documents": DOCUMENTS, **fields}
    response = server.post("/v1/rerank", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error


def test_a_model_of_another_kind_cannot_rerank(server):
    response = server.post("/v1/rerank", json={"model": CHAT, "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"


def test_models_and_health_name_each_kind(server):
    cards = {card["id"]: card for card in server.get("/v1/models").json()["data"]}
    assert (cards[RERANKER]["kind"], cards[CHAT]["kind"]) == ("rerank", "chat")
    assert "kind" not in cards[REMOTE]  # a provider's model: its kind is not known here
    assert server.get(f"/v1/models/{RERANKER}").json()["kind"] == "rerank"
    listed = {model.id: model for model in server.client().models.list().data}  # the openai SDK keeps the extension
    assert listed[RERANKER].kind == "rerank"
    kinds = {model["kind"] for model in server.health()["models"]}
    assert kinds == {"rerank", "chat"}


def test_the_reranker_unloads_and_loads_on_request(server, expected):
    unloaded = server.post(f"/v1/models/{RERANKER}/unload")
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["state"] == "unloaded"
    wait_for_state(server, "unloaded", next(m["model"] for m in server.health()["models"] if m["kind"] == "rerank"))
    loaded = server.post(f"/v1/models/{RERANKER}/load")
    assert loaded.status_code == 200, loaded.text
    assert (loaded.json()["state"], loaded.json()["memory_bytes"] > 0) == ("ready", True)
    assert [r["index"] for r in rerank(server)["results"]] == ranking(expected)


def test_cohere_clients_rerank(server, expected):
    v2 = cohere.ClientV2(api_key="anything", base_url=server.base_url, timeout=HTTP_TIMEOUT)
    answer = v2.rerank(model=RERANKER, query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [r.index for r in answer.results] == ranking(expected)[:3]
    assert [r.relevance_score for r in answer.results] == pytest.approx(sorted(expected, reverse=True)[:3], abs=1e-4)
    v1 = cohere.Client(api_key="anything", base_url=server.base_url, timeout=HTTP_TIMEOUT)
    answer = v1.rerank(model=RERANKER, query=QUERY, documents=DOCUMENTS, top_n=1, return_documents=True)
    (best,) = answer.results
    assert (best.index, best.document.text) == (ranking(expected)[0], DOCUMENTS[ranking(expected)[0]])


def test_langchain_cohere_rerank_compresses_documents(server, expected):
    client = cohere.ClientV2(api_key="anything", base_url=server.base_url, timeout=HTTP_TIMEOUT)
    reranker = CohereRerank(client=client, model=RERANKER, top_n=2)
    documents = [Document(page_content=text, metadata={"n": i}) for i, text in enumerate(DOCUMENTS)]
    kept = reranker.compress_documents(documents, QUERY)
    assert [d.metadata["n"] for d in kept] == ranking(expected)[:2]
    assert [d.metadata["relevance_score"] for d in kept] == pytest.approx(sorted(expected, reverse=True)[:2], abs=1e-4)
