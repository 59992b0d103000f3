"""SamplingParams validation and the logit adjustments (penalties, bias, min_tokens, logprobs)."""

from __future__ import annotations

import pytest
import torch

from helixflow.errors import InvalidRequestError
from helixflow.pool.llm_engine import token_seed
from helixflow.pool.logits_processing import RowState, process_logits, top_logprobs
from helixflow.pool.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"), ({"n": 0}, "n"), ({"seed": 2**64}, "seed"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"), ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids"), ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ],
)  # fmt: skip
def test_bad_values_name_the_parameter(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.param == param
    assert err.value.status == 400


def test_defaults_are_valid() -> None:
    p = SamplingParams()
    assert not p.greedy and not p.needs_penalties
    assert SamplingParams(temperature=0).greedy


def row(params: SamplingParams, prompt: list[int], output: list[int]) -> RowState:
    return RowState(params, prompt, output, eos_token_ids=[0])


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, [row(p, prompt=[1, 1, 1], output=[2, 2, 3])])
    assert out[0].tolist() == [0.0, 0.0, -1.0, -0.75, 0.0, 0.0]
    assert logits.abs().sum() == 0  # input untouched


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    out = process_logits(logits, [row(SamplingParams(repetition_penalty=2.0), [0], [1])])
    assert out[0].tolist() == [1.0, -4.0, 2.0, 1.0]


def test_only_rows_that_ask_are_adjusted() -> None:
    logits = torch.ones(3, 4)
    rows = [row(SamplingParams(), [1], [1]), row(SamplingParams(frequency_penalty=1.0), [1], [1]),
            row(SamplingParams(logit_bias={3: -100.0}), [1], [1])]  # fmt: skip
    out = process_logits(logits, rows)
    assert out[0].tolist() == [1, 1, 1, 1]
    assert out[1].tolist() == [1, 0, 1, 1]
    assert out[2].tolist() == [1, 1, 1, -99]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    p = SamplingParams(min_tokens=2, stop_token_ids=(3,))
    out = process_logits(torch.zeros(2, 5), [row(p, [1], [4]), row(p, [1], [4, 4])])
    assert out[0, 0] == float("-inf") and out[0, 3] == float("-inf") and out[0, 1] == 0
    assert bool((out[1] == 0).all())


def test_top_logprobs() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    chosen, ids, lps = top_logprobs(logits, torch.tensor([1]), 2)
    assert chosen.item() == pytest.approx(torch.log(torch.tensor(0.25)).item())
    assert ids[0].tolist() == [0, 1]
    assert lps[0].exp().tolist() == pytest.approx([0.5, 0.25])


def test_token_seeds_differ_per_index_and_fit_int64() -> None:
    seeds = {token_seed(s, i) for s in (0, 1, -5, 2**62) for i in range(100)}
    assert len(seeds) == 400
    assert all(-(2**63) <= s < 2**63 for s in seeds)
