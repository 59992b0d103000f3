"""Incremental detokenization and stop strings, with a byte-level decoder.

``ByteDecoder`` maps each id to raw bytes and decodes with replacement, which is exactly how a
byte-level BPE tokenizer treats a character split across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helixflow.pool.detokenizer import IncrementalDetokenizer

SPECIAL = 0  # an id that decodes to nothing when special tokens are skipped


class ByteDecoder:
    def __init__(self, vocab: dict[int, bytes]) -> None:
        self.vocab = vocab

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        raw = b"".join(b"" if (i == SPECIAL and skip_special_tokens) else self.vocab[i]
                       for i in ids)  # fmt: skip
        return raw.decode("utf-8", errors="replace")


def tokens_of(text: str, chunk: int = 1) -> tuple[ByteDecoder, list[int]]:
    """Split ``text``'s UTF-8 bytes into ``chunk``-byte tokens (splitting characters)."""
    data = text.encode()
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    vocab = {SPECIAL: b"<s>"} | {i + 1: p for i, p in enumerate(pieces)}
    return ByteDecoder(vocab), list(range(1, len(pieces) + 1))


def run(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add_token(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_split_characters_are_emitted_whole(chunk: int) -> None:
    text = "héllo wörld — 日本語 🙂 done"
    dec, ids = tokens_of(text, chunk)
    deltas = run(IncrementalDetokenizer(dec), ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_are_skipped() -> None:
    dec, ids = tokens_of("ab")
    assert "".join(run(IncrementalDetokenizer(dec), [ids[0], SPECIAL, ids[1]])) == "ab"


def test_stop_string_cuts_the_text_and_is_never_sent() -> None:
    dec, ids = tokens_of("The answer is 42.\n\nUser: next")
    detok = IncrementalDetokenizer(dec, stop=["\n\nUser:"])
    deltas = run(detok, ids)
    assert "".join(deltas) == "The answer is 42."
    assert detok.stopped_by == "\n\nUser:"
    assert detok.add_token(ids[0]) == ""  # over


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    dec, ids = tokens_of("a ST b")
    detok = IncrementalDetokenizer(dec, stop=["STOP"])
    deltas = [detok.add_token(i) for i in ids]
    assert deltas[:4] == ["a", " ", "", ""]  # "S", "ST" might start "STOP"
    assert deltas[4] == "ST "
    assert "".join(deltas) + detok.flush() == "a ST b"
    assert detok.stopped_by is None


def test_earliest_of_several_stop_strings_wins() -> None:
    dec, ids = tokens_of("xx END yy STOP")
    detok = IncrementalDetokenizer(dec, stop=["STOP", "END"])
    assert "".join(run(detok, ids)) == "xx "
    assert detok.stopped_by == "END"


def test_unfinished_character_at_the_end_is_flushed_as_replacement() -> None:
    dec, ids = tokens_of("ok 🙂", 1)
    detok = IncrementalDetokenizer(dec)
    text = "".join(detok.add_token(i) for i in ids[:-1])
    assert text == "ok "
    assert detok.flush() == "\ufffd"


@given(st.text(min_size=1, max_size=40), st.integers(1, 4),
       st.lists(st.text(min_size=1, max_size=4), max_size=3))  # fmt: skip
def test_stream_equals_batch_decode_up_to_first_stop(
    text: str, chunk: int, stops: list[str]
) -> None:
    dec, ids = tokens_of(text, chunk)
    detok = IncrementalDetokenizer(dec, stop=stops)
    streamed = "".join(run(detok, ids))
    hits = [(text.find(s), s) for s in stops if text.find(s) >= 0]
    # A stop string can only match on whole decoded characters, which `text` is made of.
    expected = text[: min(hits)[0]] if hits else text
    assert streamed == expected
