"""Incremental detokenization with stop strings: the text of a growing list of token ids,
handed out in deltas, and cut before the first stop string.

Each step decodes only the tokens since the last emitted text, starting from the token
before them, so a step costs O(1) tokens, not O(n). A token that ends inside a multi-byte
character decodes to U+FFFD; its text waits for the rest of the character.

Stop strings: text that could be the start of a stop string is held back until the next
tokens show whether the stop string follows (a stop string may be split across any number
of tokens). The client never sees any part of a stop string; what was held back and
turned out not to be one is handed out with the next delta, or by `flush` at the end.
With `include_stop` (vLLM's include_stop_str_in_output) the stop string that ended the text
is handed out too, and nothing after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


class Detokenizer:
    def __init__(
        self, decode: Decode, stops: Sequence[str] = (), *, include_stop: bool = False
    ) -> None:
        """`decode`: token ids -> text; `stops`: non-empty strings."""
        self._decode = decode
        self.stops = list(stops)
        self.include_stop = include_stop
        self.tokens: list[int] = []
        self.text = ""  # decoded so far; cut before the stop string once one is found
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop string was found: add no more tokens
        self._prefix = 0  # tokens[_prefix:_read] decoded to the text already taken
        self._read = 0

    def add(self, token_id: int) -> str:
        """Take one token; the text that can be handed out now ('' while a character is
        incomplete or the text may be the start of a stop string)."""
        assert not self.stopped, "a stopped detokenizer takes no more tokens"
        self.tokens.append(token_id)
        taken = self.tokens[self._prefix : self._read]
        before = self._decode(taken) if taken else ""
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # the rest of a multi-byte character is still to come
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += after[len(before) :]
        cut = first_stop(self.text, self.stops, self.sent)
        if cut is not None:
            if self.include_stop:
                cut += max(len(s) for s in self.stops if self.text.startswith(s, cut))
            self.text = self.text[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - held_back(self.text, self.stops, self.sent))

    def flush(self) -> str:
        """The text still held back (the request ended without its stop string)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


def first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index where the earliest stop string in `text[start:]` begins. Text before `start`
    was handed out, so no stop string begins there (it would have been held back)."""
    found = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str], start: int) -> int:
    """Length of the longest end of `text[start:]` that a stop string begins with."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
