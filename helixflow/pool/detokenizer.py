"""Incremental detokenization and stop strings, per request.

Byte-level BPE tokens do not map to whole characters: a multi-byte character can span tokens and
a token's text can depend on its left neighbour (leading spaces). So text is produced by decoding
a short window of recent tokens and diffing: ``decode(ids[prefix:])`` minus
``decode(ids[prefix:read])`` is the new text; while it ends in U+FFFD (an unfinished UTF-8
sequence) nothing is emitted yet.

Stop strings are matched on the detokenized text. The text a client has been sent never contains
a stop string or its start: the longest tail that could still begin a stop string is held back
until the next tokens decide it (and flushed when the request ends for another reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# NOTE: how many tokens before the read position are re-decoded for context; enough for
# byte-level BPE (a character is at most 4 bytes) and for leading-space rules.
_CONTEXT_TOKENS = 6


class Decoder(Protocol):
    """The part of a tokenizer this module needs."""

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas, honouring stop strings."""

    def __init__(
        self,
        decoder: Decoder,
        prompt_tail: Sequence[int] = (),
        *,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = decoder
        self._skip = skip_special_tokens
        # The last prompt tokens give the first generated token its left context.
        self._ids: list[int] = list(prompt_tail[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all text decided so far (stop string excluded)
        self._sent = 0  # how much of `text` has been returned as deltas
        self.stopped_by: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip)

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text that may be sent now ("" while undecided).

        After a stop string matched (``stopped_by`` is set) the request is over: the text is cut
        just before the match and further tokens are ignored.
        """
        if self.stopped_by is not None:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return self._delta(final=False)  # an unfinished character: wait for more bytes
        new = after[len(before) :]
        self._prefix = max(self._read, len(self._ids) - _CONTEXT_TOKENS)
        self._read = len(self._ids)
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += new
        if self._stop:
            cut = self._find_stop(start)
            if cut is not None:
                return self._delta(final=True)
        return self._delta(final=False)

    def _find_stop(self, start: int) -> int | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        self.stopped_by = best[1]
        return best[0]

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _delta(self, *, final: bool) -> str:
        end = len(self.text) if final or not self._stop else len(self.text) - self._held_back()
        end = max(end, self._sent)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def flush(self) -> str:
        """The request ended (length, EOS, abort): release whatever was held back.

        Tokens still waiting to complete a character are decoded as they are (U+FFFD).
        """
        if self.stopped_by is None and self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix : self._read])
            after = self._decode(self._ids[self._prefix :])
            self.text += after[len(before) :]
            self._read = len(self._ids)
            if self._stop:
                self._find_stop(max(0, len(self.text) - len(after) - self._max_stop + 1))
        return self._delta(final=True)
