"""The scheduler's C steps (steps.c) through ctypes: the state they share with Python, and the ring of sampled
tokens between the engine's thread and the event loop.

Why C: between two `llama_decode` calls the engine's thread ran Python (logits, argmax, text, the batch)
holding the GIL, while the event loop's per-token Python waited for it and then ran during the next decode,
on the decode's cores. `gw_run` steps every decoding sequence without the GIL; the event loop turns the
tokens into text, beside it. Figures: docs/design/c-steps.md.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

# Per-slot int32 columns, pointer columns, flags, finishes and gw_run's returns: as in steps.c.
TAG, POS, COUNT, LEFT, FLAGS, FINISHED, BIAS_COUNT, WATCH, COLUMNS = range(9)
CHAIN, BIAS_IDS, BIAS_VALUES, HISTORY, GRAMMAR, POINTERS = range(6)
DECODING, STOP_AT_EOG, EMIT = 1, 2, 4
NOT_FINISHED, FINISHED_EOG, FINISHED_LENGTH = 0, 1, 2
NO_WATCH = -1
RUN_INTERRUPTED, RUN_FINISHED, RUN_RING_FULL, RUN_TIMED_OUT = -1001, -1002, -1003, -1004
WRITTEN, READ, INTERRUPT = range(3)
RING_ENTRIES = 1 << 16  # sampled tokens not yet read by the event loop; gw_run pauses when it runs short
MAX_RUN_S = 0.05  # gw_run returns this often, so a long run of steps never looks like a stalled one


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


class _State(ctypes.Structure):
    _fields_ = [
        ("decode", ctypes.c_void_p),
        ("get_logits", ctypes.c_void_p),
        ("sample", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p),
        ("batch", ctypes.c_void_p),
        ("n_vocab", ctypes.c_int32),
        ("n_slots", ctypes.c_int32),
        ("eog", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
        ("pointers", ctypes.c_void_p),
        ("ring", ctypes.c_void_p),
        ("ring_size", ctypes.c_int64),
        ("counters", ctypes.c_void_p),
        ("notify_fd", ctypes.c_int32),
        ("max_run_s", ctypes.c_double),
        ("apply", ctypes.c_void_p),
        ("accept", ctypes.c_void_p),
        ("candidates", ctypes.c_void_p),
    ]


def _library() -> ctypes.CDLL:
    """The compiled steps.c, built by `pip install` (setup.py) next to this file."""
    here = os.path.dirname(__file__)
    found = sorted(glob.glob(os.path.join(here, "_steps*.so")))
    if not found:
        raise ImportError(f"engines/llamacpp/steps.c is not compiled: run `pip install -e .` (no _steps*.so in {here})")
    library = ctypes.CDLL(found[0])
    stale = ImportError(f"{found[0]} predates engines/llamacpp/steps.c: run `pip install -e .` to rebuild it")
    state = ctypes.c_void_p
    for name, argtypes, restype in [
        ("gw_columns", [], ctypes.c_int32),
        ("gw_run", [state], ctypes.c_int32),
        ("gw_sample_outputs", [state], ctypes.c_int32),
        ("gw_emit", [state, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], None),
        ("gw_ring_room", [state], ctypes.c_int64),
        ("gw_take", [state, ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64),
    ]:
        function = getattr(library, name, None)
        if function is None:
            raise stale
        function.argtypes, function.restype = argtypes, restype
    if library.gw_columns() != COLUMNS * 100 + POINTERS:  # a library built for other columns would write past them
        raise stale
    return library


_lib = _library()


@dataclass
class SlotSampling:
    """How one sequence's next token is chosen in C: llama.cpp's sampler chain (checked against a grammar sampler,
    where the output is constrained), or greedy with biases."""

    chain: Any = None  # a llama_sampler chain (the binding's pointer)
    grammar: Any = None  # a llama_sampler of a grammar, kept out of the chain (steps.c: sample_constrained)
    bias_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    bias_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def free(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
        self.chain = self.grammar = None


class Steps:
    """The state steps.c works on, owned here; the numpy arrays are its memory."""

    def __init__(self, ctx, batch, eog_ids: frozenset[int], n_vocab: int, slots: int, context_length: int):
        self.slots = slots
        self.columns = np.zeros((slots, COLUMNS), np.int32)
        self.history = np.zeros((slots, context_length), np.int32)  # each slot's tokens, generated ones written by C
        self._pointers = np.zeros((slots, POINTERS), np.uintp)
        rows = np.arange(slots, dtype=np.uintp) * self.history.strides[0]
        self._pointers[:, HISTORY] = self.history.ctypes.data + rows
        self._eog = np.zeros(n_vocab, np.uint8)
        self._eog[list(eog_ids)] = 1
        self._ring = np.zeros((RING_ENTRIES, 3), np.int32)
        self._taken = np.zeros((RING_ENTRIES, 3), np.int32)  # the event loop's copy of what it drains
        self._taken_address = self._taken.ctypes.data
        self._counters = np.zeros(3, np.int64)
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._batch = batch  # kept alive: the state points at it
        self._samplings: list[SlotSampling | None] = [None] * slots  # kept alive: the state points at their arrays
        self._candidates = np.zeros(n_vocab * 3, np.float32)  # llama_token_data: id, logit, p
        self._state = _State(
            decode=_address(llama_cpp.llama_decode),
            get_logits=_address(llama_cpp.llama_get_logits),
            sample=_address(llama_cpp.llama_sampler_sample),
            ctx=ctx,
            batch=ctypes.addressof(batch.native),
            n_vocab=n_vocab,
            n_slots=slots,
            eog=self._eog.ctypes.data,
            slots=self.columns.ctypes.data,
            pointers=self._pointers.ctypes.data,
            ring=self._ring.ctypes.data,
            ring_size=RING_ENTRIES,
            counters=self._counters.ctypes.data,
            notify_fd=self.notify_fd,
            max_run_s=MAX_RUN_S,
            apply=_address(llama_cpp.llama_sampler_apply),
            accept=_address(llama_cpp.llama_sampler_accept),
            candidates=self._candidates.ctypes.data,
        )
        self._address = ctypes.addressof(self._state)

    # ---- the engine's thread ---------------------------------------------------------------

    def occupy(self, slot: int, tag: int, tokens: int, cached: int, left: int, flags: int, sampling: SlotSampling):
        """A sequence takes `slot`: `tokens` in its prompt, `cached` of them already in the KV cache, `left` it may
        generate."""
        self.columns[slot] = (tag, cached, tokens, left, flags, NOT_FINISHED, len(sampling.bias_ids), NO_WATCH)
        self.resample(slot, sampling)

    def resample(self, slot: int, sampling: SlotSampling) -> None:
        """How the slot's tokens are chosen from now on (the caller frees the sampling it replaces)."""
        self.columns[slot, BIAS_COUNT] = len(sampling.bias_ids)
        chain = ctypes.cast(sampling.chain, ctypes.c_void_p).value if sampling.chain else 0
        self._pointers[slot, :HISTORY] = (chain, sampling.bias_ids.ctypes.data,
                                          sampling.bias_values.ctypes.data)  # fmt: skip
        self._pointers[slot, GRAMMAR] = ctypes.cast(sampling.grammar, ctypes.c_void_p).value if sampling.grammar else 0
        self._samplings[slot] = sampling

    def vacate(self, slot: int) -> None:
        self.columns[slot, FLAGS] = 0
        self._samplings[slot] = None

    def run(self) -> int:
        """Steps the DECODING slots (see gw_run); the scheduler clears the interrupt before it looks at its inbox."""
        return _lib.gw_run(self._address)

    def sample_outputs(self) -> int:
        """Samples the outputs of the batch just decoded; returns how many sequences finished or reached their watch."""
        return _lib.gw_sample_outputs(self._address)

    def emit(self, tag: int, token: int, finish: int) -> None:
        _lib.gw_emit(self._address, tag, token, finish)

    def ring_short(self) -> bool:
        """Whether the ring may not hold one more token for every slot (gw_run would not step)."""
        return _lib.gw_ring_room(self._address) < self.slots

    def clear_interrupt(self) -> None:
        self._counters[INTERRUPT] = 0

    # ---- the event loop --------------------------------------------------------------------

    def interrupt(self) -> None:
        """Makes gw_run return after its current step."""
        self._counters[INTERRUPT] = 1

    def take(self) -> list[list[int]]:
        """The sampled tokens not read yet, as [tag, token, finish], oldest first."""
        count = _lib.gw_take(self._address, self._taken_address, RING_ENTRIES)
        return self._taken[:count].tolist() if count else []

    def close(self) -> None:
        os.close(self.notify_fd)
