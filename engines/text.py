"""Text helpers shared by all engines: when to tokenize off the event loop, and stop-sequence matching over a
stream of text pieces."""

from __future__ import annotations

# Texts up to this size are tokenized in place: Hugging Face's tokenizers take less for them than a hop to a
# worker thread. (llama.cpp's tokenizer is slower: the llama.cpp engine tokenizes on threads, and a burst's
# hand-over waits for them.)
INLINE_TOKENIZE_CHARS = 1024


class StopMatcher:
    """Cuts a growing text at the first stop sequence, holding back a tail that may start one.

    Streaming needs the hold-back: with stop "###", the piece "#" must not be sent until the next
    piece shows whether it is the start of the stop sequence.
    """

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the stop sequence hit if one was: the first in the text)."""
        if not self._stops:  # most requests: nothing to look for, once per generated token
            return text, None
        buffer = self._held + text
        hits = [(at, stop) for stop in self._stops if (at := buffer.find(stop)) >= 0]
        if hits:
            self._held = ""
            at, stop = min(hits)
            return buffer[:at], stop
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """Release the held-back tail (the sequence ended without completing a stop)."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
