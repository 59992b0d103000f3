"""Per-request logit adjustments applied to a step's batch of logits before sampling.

Order (vLLM's): penalties (repetition over prompt + output; presence and frequency over the
output, OpenAI's definitions) -> ``logit_bias`` -> ``min_tokens`` (EOS and stop token ids
masked until enough tokens were generated). Log-probabilities reported to clients are taken
after these adjustments and before temperature and the top-k/top-p/min-p filters.

All of it is batched torch; rows that need nothing cost nothing beyond a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from helixflow.pool.sampling_params import SamplingParams


@dataclass
class RowState:
    """What the processors need to know about one row of the batch."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    eos_token_ids: Sequence[int]


def _counts(rows: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(rows), vocab]`` float token counts."""
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    longest = max((len(r) for r in rows), default=0)
    if longest == 0:
        return counts
    ids = torch.full((len(rows), longest), vocab, dtype=torch.int64)  # `vocab`: padding column
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
    padded = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    padded.scatter_add_(1, ids.to(device), torch.ones_like(ids, dtype=torch.float32, device=device))
    return padded[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> None:
    """In place on ``logits [B, V]`` fp32 for the rows whose parameters ask for penalties."""
    idx = [i for i, r in enumerate(rows) if r.params.needs_penalties]
    if not idx:
        return
    vocab = logits.shape[1]
    sub = logits[idx]
    out_counts = _counts([rows[i].output_ids for i in idx], vocab, logits.device)
    rep = torch.tensor([rows[i].params.repetition_penalty for i in idx], device=logits.device)
    if bool((rep != 1.0).any()):
        seen = _counts([[*rows[i].prompt_ids, *rows[i].output_ids] for i in idx], vocab,
                       logits.device) > 0  # fmt: skip
        r = rep[:, None].expand_as(sub)
        penalised = torch.where(sub > 0, sub / r, sub * r)
        sub = torch.where(seen, penalised, sub)
    freq = torch.tensor([rows[i].params.frequency_penalty for i in idx], device=logits.device)
    pres = torch.tensor([rows[i].params.presence_penalty for i in idx], device=logits.device)
    sub = sub - freq[:, None] * out_counts - pres[:, None] * (out_counts > 0).float()
    logits[idx] = sub


def apply_logit_bias_and_min_tokens(logits: torch.Tensor, rows: Sequence[RowState]) -> None:
    """In place: add each row's ``logit_bias``; mask EOS/stop ids below ``min_tokens``."""
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            if ids:
                logits[i, ids] += torch.tensor([p.logit_bias[t] for t in ids], device=logits.device)
        if len(r.output_ids) < p.min_tokens:
            banned = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if t < vocab]
            if banned:
                logits[i, banned] = float("-inf")


def process_logits(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """``logits [B, V]`` -> adjusted fp32 logits (a new tensor; the input is not modified)."""
    out = logits.float().clone()
    apply_penalties(out, rows)
    apply_logit_bias_and_min_tokens(out, rows)
    return out


def top_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``chosen [B]`` and the ``k`` most likely tokens of each row.

    Returns ``(chosen_logprob [B], top_ids [B, k], top_logprob [B, k])``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(1, chosen.view(-1, 1).long()).squeeze(1)
    if k == 0:
        empty = logp.new_empty(logp.shape[0], 0)
        return chosen_lp, empty.long(), empty
    values, ids = logp.topk(k, dim=-1)
    return chosen_lp, ids, values
