"""Thin helpers over llama-cpp-python's ctypes bindings (the C API of llama.cpp).

We use the C API rather than `llama_cpp.Llama`: `Llama` decodes one sequence at a time and needs
`logits_all` for logprobs, while the scheduler here batches many sequences in one context.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
from typing import Iterator

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from engines.base import SamplingParams
from engines.llamacpp.steps import SlotSampling

PENALTY_WINDOW = 256  # tokens the repetition/presence/frequency penalties look back over
_native_log = logging.getLogger("llama-cpp-python")
# ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error; 5 continues the previous message's level.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@llama_cpp.llama_log_callback
def _log_to_python(level: int, text: bytes, _user_data) -> None:
    # llama.cpp would print to stderr itself; through logging its lines become JSON like ours.
    if level != 5:
        _last_level[0] = _LOG_LEVELS.get(level, logging.DEBUG)
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        _native_log.log(_last_level[0], message)


# A C function that ignores the log line: libc's `abs` reads only its first argument (the level), and its
# result is dropped, which the platform's C calling convention allows.
_DISCARD = ctypes.cast(ctypes.CDLL(None).abs, llama_cpp.llama_log_callback)


@contextlib.contextmanager
def native_logs_while_loading() -> Iterator[None]:
    """llama.cpp's log lines reach Python logging while a model loads (what was loaded, and why it failed);
    after that they are dropped in C unless the gateway logs at debug level. A Python callback takes the
    GIL for every line, and CUDA builds log one on every decode step ("CUDA Graph id ... reused"): on an
    H100 the engine thread spent a quarter of its time waiting for the GIL there (docs/BENCHMARKS.md)."""
    llama_cpp.llama_log_set(_log_to_python, ctypes.c_void_p(0))
    try:
        yield
    finally:
        if not _native_log.isEnabledFor(logging.DEBUG):
            llama_cpp.llama_log_set(_DISCARD, ctypes.c_void_p(0))


class Vocab:
    """Tokenizer and detokenizer of a loaded model; read-only, so safe from any thread."""

    def __init__(self, model):
        self.ptr = llama_cpp.llama_model_get_vocab(model)
        self.size = llama_cpp.llama_vocab_n_tokens(self.ptr)
        self.bos = llama_cpp.llama_vocab_bos(self.ptr)
        self.eos = llama_cpp.llama_vocab_eos(self.ptr)
        # Every end-of-generation token, not just EOS and EOT (SmolLM2 has three): `ignore_eos` biases them all
        # off, as llama-server does, and the C steps look each sampled token up in a table made from them.
        self.eog_ids = frozenset(t for t in range(self.size) if llama_cpp.llama_vocab_is_eog(self.ptr, t))
        self._pieces: dict[tuple[int, bool], bytes] = {}  # token pieces never change; writes race harmlessly

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.ptr, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:  # buffer too small: the negative value is the size needed
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.ptr, data, len(data), buffer, capacity, add_special, parse_special)
        return list(buffer[:count])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The token's bytes; cached, since the scheduler asks for one per generated token."""
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is None:
            cached = self._pieces[key] = self._piece(token, special)
        return cached

    def _piece(self, token: int, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self.ptr, token, buffer, len(buffer), 0, special)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.ptr, token, buffer, len(buffer), 0, special)
        return buffer.raw[:size]


def model_metadata(model, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(1 << 16)
    size = llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    if size < 0:
        return None
    if size >= len(buffer):
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    return buffer.value.decode("utf-8", errors="replace")


def json_grammar(schema: dict) -> str:
    """GBNF for JSON matching `schema`. Whitespace is limited to one optional space between tokens,
    so a small model cannot fill `max_tokens` with newlines and never close the object."""
    return json_schema_to_gbnf(json.dumps(schema))


def build_sampling(vocab: Vocab, params: SamplingParams, grammar: str | None) -> SlotSampling:
    """How C picks one sequence's tokens: greedy with its biases, or else llama.cpp's sampler chain.

    The chain copies all n_vocab logits into a candidate array on every call: 105 µs for SmolLM2's 49,152
    (175-209 µs right after a step on the 2-core CI machine), against 12 µs for steps.c's argmax. Greedy with
    biases needs none of that; penalties and grammars keep the chain (they have state)."""
    if params.temperature == 0 and grammar is None and not _penalized(params):
        biases = _biases(vocab, params)
        ids = sorted(biases)
        return SlotSampling(
            bias_ids=np.array(ids, dtype=np.int32), bias_values=np.array([biases[t] for t in ids], dtype=np.float32)
        )
    return SlotSampling(chain=native_sampler(vocab, params, grammar))


def _biases(vocab: Vocab, params: SamplingParams) -> dict[int, float]:
    biases = {token: bias for token, bias in params.logit_bias.items() if 0 <= token < vocab.size}
    if params.ignore_eos:
        biases.update({token: float("-inf") for token in vocab.eog_ids})
    return biases


def _penalized(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


def native_sampler(vocab: Vocab, params: SamplingParams, grammar: str | None):
    """llama.cpp's sampler chain, in the order llama-server uses."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        if not sampler:
            llama_cpp.llama_sampler_free(chain)
            raise ValueError("llama.cpp refused the sampler settings (invalid grammar?)")
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    biases = _biases(vocab, params)
    if biases:
        array = (llama_cpp.llama_logit_bias * len(biases))()
        for slot, (token, bias) in zip(array, biases.items()):
            slot.token, slot.bias = token, bias
        add(llama_cpp.llama_sampler_init_logit_bias(vocab.size, len(biases), array))
    if _penalized(params):
        add(
            llama_cpp.llama_sampler_init_penalties(
                vocab.size, PENALTY_WINDOW, params.repetition_penalty, params.frequency_penalty, params.presence_penalty
            )
        )
    if grammar is not None:
        add(llama_cpp.llama_sampler_init_grammar(vocab.ptr, grammar.encode(), b"root"))
    if params.temperature == 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
    add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


# llama_get_logits with the address as an int: the binding's float pointer costs a ctypes.cast per call.
_get_logits_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
    ctypes.cast(llama_cpp.llama_get_logits, ctypes.c_void_p).value
)


def output_logits(ctx, outputs: int, n_vocab: int) -> np.ndarray:
    """The last decode's logits, one row per output in batch order (a view, valid until the next decode).

    One call into llama.cpp for the whole step (it waits for the GPU there), not one per sequence. Right
    after a step, on the 2-core CI machine, llama_get_logits_ith plus a ctypes.cast and np.frombuffer took
    about 100 µs per sequence; the view here is made once per buffer and size."""
    address = _get_logits_address(ctx)
    if not address:
        raise RuntimeError("llama.cpp returned no logits")
    return _logits_view(address, outputs, n_vocab)


@functools.lru_cache(maxsize=64)
def _logits_view(address: int, rows: int, n_vocab: int) -> np.ndarray:
    # Safe to reuse while llama.cpp's buffer starts at `address`: it holds at least the `rows` just decoded.
    array = (ctypes.c_float * (rows * n_vocab)).from_address(address)
    view = np.frombuffer(array, dtype=np.float32).reshape(rows, n_vocab)
    view.flags.writeable = False  # llama.cpp's memory: samplers rank copies
    return view


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class Batch:
    """A reusable llama_batch over numpy arrays, filled a run of one sequence's tokens at a time.

    Filling it a token at a time through the ctypes fields took about 2 µs a token: 1 ms of Python inside
    every 512-token prefill step on the 2-core CI machine. A run is a few slice assignments instead (46 µs for
    512 tokens); a 16-request burst's first token on an H200 came 2-5 ms sooner (docs/BENCHMARKS.md). Each
    token belongs to one sequence: `seq_id[i]` points at `_seq[i]`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._token = np.zeros(capacity, dtype=np.int32)
        self._pos = np.zeros(capacity, dtype=np.int32)
        self._seq = np.zeros(capacity, dtype=np.int32)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        self._logits = np.zeros(capacity, dtype=np.int8)
        # The addresses of _seq's entries: llama.cpp's array of per-token pointers to sequence ids.
        self._seq_ids = self._seq.ctypes.data + np.arange(capacity, dtype=np.uintp) * self._seq.itemsize
        self.native = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            pos=self._pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ids.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            logits=self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    @property
    def size(self) -> int:
        return self.native.n_tokens

    def clear(self) -> None:
        self.native.n_tokens = 0

    def add(self, tokens: list[int], first_pos: int, seq_id: int, outputs: int) -> int:
        """Append `tokens` of sequence `seq_id` at positions from `first_pos`; the last `outputs` of them produce
        logits (or embeddings). Returns the batch index of the last token."""
        start = self.size
        end = start + len(tokens)
        if len(tokens) == 1:  # a decoding sequence's token: scalar stores cost a fifth of slice assignments
            self._token[start], self._pos[start] = tokens[0], first_pos
            self._seq[start], self._logits[start] = seq_id, outputs
            self.native.n_tokens = end
            return start
        self._token[start:end] = tokens
        self._pos[start:end] = np.arange(first_pos, first_pos + len(tokens), dtype=np.int32)
        self._seq[start:end] = seq_id
        self._logits[start:end] = 0
        self._logits[end - outputs : end] = 1
        self.native.n_tokens = end
        return end - 1
