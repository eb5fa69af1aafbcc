"""The llama.cpp engine's own C steps against llama.cpp itself, on the real model file (no gateway process):
slower than the unit lane allows, so it lives with the engine checks."""

from __future__ import annotations

from engines.base import SamplingParams
from gateway.settings import PROJECT_ROOT


def test_greedy_sampling_in_c_picks_what_llama_cpps_chain_picks():
    """Greedy requests skip llama.cpp's sampler chain (it copies every logit into candidates on each call) for
    steps.c's argmax; with and without biases, including biases that move the top token, the choice must stay
    the same, and the logits must be the model's again afterwards (logprobs read them)."""
    import llama_cpp

    from engines.llamacpp.native import Batch, Vocab, build_sampling, native_sampler, output_logits
    from engines.llamacpp.steps import COUNT, Steps

    path = PROJECT_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 256, 2, 2
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab, batch = Vocab(model), Batch(64)
    steps = Steps(ctx, batch, vocab.eog_ids, vocab.size, slots=1, context_length=256)
    bias_sets = [
        {},
        {token: float("-inf") for token in vocab.eog_ids},
        {token: -1.5 for token in range(0, vocab.size, 3)},  # often the top token itself
        {token: 12.0 for token in range(100, vocab.size, 997)},  # biased tokens often win
    ]
    try:
        for biases in bias_sets:
            sampling = SamplingParams(max_tokens=1, temperature=0, logit_bias=biases)
            chain, ours = native_sampler(vocab, sampling), build_sampling(vocab, sampling, None)
            assert ours.chain is None
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
            prompt = vocab.tokenize([b"Write a story about a cat"], add_special=True, parse_special=False)
            steps.occupy(0, tag=0, tokens=len(prompt), cached=0, left=1000, flags=0, sampling=ours)
            batch.clear()
            batch.add(prompt, 0, 0, outputs=1)
            picked = []
            for position in range(len(prompt), len(prompt) + 30):
                assert llama_cpp.llama_decode(ctx, batch.native) == 0
                logits = output_logits(ctx, 1, vocab.size)[0].copy()
                expected = llama_cpp.llama_sampler_sample(chain, ctx, batch.size - 1)
                steps.sample_outputs()
                assert steps.history[0, steps.columns[0, COUNT] - 1] == expected, (biases and min(biases), position)
                assert (output_logits(ctx, 1, vocab.size)[0] == logits).all()
                picked.append(expected)
                batch.clear()
                batch.add([expected], position, 0, outputs=1)
            llama_cpp.llama_sampler_free(chain)
            assert len(set(picked)) > 1  # a continuation, not one token repeated
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)

