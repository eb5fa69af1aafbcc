"""A prompt longer than a batch (LLM_BATCH_SIZE): llama.cpp's scheduler feeds it to the model a batch at a time,
and the model sees the whole prompt, as when one batch holds it all."""

from __future__ import annotations

from tests.conftest import MODEL, start_server

SMALL_BATCH = 8
PROMPT = "The violet kettle hums beside seven paper lanterns while Oskar counts the quiet trains. " * 3
SETTINGS = {"LLM_CTX": "512", "LLM_PARALLEL": "1", "LLM_EMBEDDING": "false"}


def greedy_continuation(tmp_path, batch_size: int) -> tuple[str, int]:
    server = start_server(tmp_path, {"LLM_BATCH_SIZE": str(batch_size), **SETTINGS})
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        response = server.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        return reply["choices"][0]["text"], reply["usage"]["prompt_tokens"]
    finally:
        server.stop()


def test_a_prompt_longer_than_a_batch_gets_the_answer_of_one_batch(tmp_path):
    """Greedy: were a batch of the prompt lost or put at the wrong positions, the answer would differ."""
    whole, prompt_tokens = greedy_continuation(tmp_path, 512)
    assert prompt_tokens > 5 * SMALL_BATCH and whole.strip()
    assert greedy_continuation(tmp_path, SMALL_BATCH) == (whole, prompt_tokens)
