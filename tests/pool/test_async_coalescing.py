"""A reader that falls behind gets one merged output per choice, never a lost token."""

from __future__ import annotations

from helixflow.pool.async_engine import _coalesced, merge_outputs
from helixflow.pool.llm_engine import RequestOutput, TokenLogprob


def out(index: int, token: int, text: str, *, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        request_id="r", new_token_ids=[token], new_text=text, finished=finished,
        finish_reason="stop" if finished else None, num_prompt_tokens=5,
        num_output_tokens=token, logprobs=[TokenLogprob(token, -0.5, [])], index=index,
        request_finished=finished,
    )  # fmt: skip


def test_merge_joins_tokens_text_and_logprobs_and_keeps_the_later_state() -> None:
    merged = merge_outputs(out(0, 1, "He"), out(0, 2, "llo", finished=True))
    assert merged.new_token_ids == [1, 2] and merged.new_text == "Hello"
    assert [lp.token_id for lp in merged.logprobs] == [1, 2]
    assert merged.finished and merged.finish_reason == "stop" and merged.num_output_tokens == 2


def test_coalesced_merges_runs_of_one_choice_only_and_keeps_errors_in_place() -> None:
    error = RuntimeError("engine died")
    items = [out(0, 1, "a"), out(0, 2, "b"), out(1, 3, "c"), out(0, 4, "d"), error, out(0, 5, "e")]
    got = _coalesced(items)  # type: ignore[arg-type]
    assert [(o.index, o.new_token_ids) for o in got[:3]] == [(0, [1, 2]), (1, [3]), (0, [4])]  # type: ignore[union-attr]
    assert got[3] is error and got[4].new_token_ids == [5]  # type: ignore[union-attr]
    # a finished choice is never merged into (its last output must stay the last)
    done = _coalesced([out(0, 1, "x", finished=True), out(0, 2, "y")])
    assert len(done) == 2
