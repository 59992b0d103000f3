"""Decode CUDA graphs: bucket choice, the static-buffer plumbing (on the CPU, with a stand-in
graph that replays by running the model eagerly from the static buffers), and on a GPU the
real capture against eager execution."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helixflow.pool.cuda_graphs import DecodeGraphs, batch_buckets
from helixflow.pool.llm_engine import LLMEngine, RequestOutput
from helixflow.pool.models.loader import LoadedModel
from helixflow.pool.runner import EngineOptions, build_engine
from helixflow.pool.sampling_params import SamplingParams

QUESTIONS = ["What is the capital of France?", "Name a red fruit.", "What is 3 plus 4?",
             "Say hi.", "Who painted the Mona Lisa?"]  # fmt: skip


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(256)[-3:] == [224, 240, 256]


def generate(engine: LLMEngine, max_tokens: list[int]) -> dict[str, list[int]]:
    for i, n in enumerate(max_tokens):
        prompt = engine.tokenizer.encode_chat(  # type: ignore[attr-defined]
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        )
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n,
                                                          ignore_eos=True))  # fmt: skip
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        out: RequestOutput
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got


class _EagerGraph:
    """Stands in for a captured graph: 'replays' by running the model on the static buffers."""

    def __init__(self, graphs: DecodeGraphs, size: int) -> None:
        self.graphs, self.size, self.replays = graphs, size, 0

    def replay(self) -> None:
        self.replays += 1
        self.graphs.outputs[self.size].copy_(self.graphs._forward(self.size))


def test_static_buffers_and_padding_rows_give_the_eager_tokens(smollm: LoadedModel) -> None:
    """Five requests of different lengths shrink the decode batch from 5 to 1 as they finish,
    so buckets 8, 4, 2 and 1 all run with padding rows (slot -1, length 0)."""
    opts = EngineOptions(max_model_len=256, num_blocks=64)
    lengths = [9, 3, 6, 2, 12]
    eager = generate(build_engine(smollm, opts), lengths)

    engine = build_engine(smollm, opts)
    graphs = DecodeGraphs(engine.model, engine.kv_caches, max_num_seqs=8, max_model_len=256,
                          max_blocks_per_seq=engine.builder.block_tables.shape[1])  # fmt: skip
    hidden = engine.model.embed_tokens.shape[1]  # type: ignore[attr-defined]
    stand_ins: dict[int, Any] = {}
    for size in graphs.sizes:
        stand_ins[size] = graphs.graphs[size] = _EagerGraph(graphs, size)  # type: ignore[assignment]
        graphs.outputs[size] = torch.empty(size, hidden)
    engine.graphs = graphs
    assert generate(engine, lengths) == eager
    assert graphs.enabled and graphs.checked == {1, 2, 4, 8}
    assert all(g.replays >= 1 for g in stand_ins.values())


def test_a_graph_that_disagrees_with_eager_is_switched_off(smollm: LoadedModel) -> None:
    engine = build_engine(smollm, EngineOptions(max_model_len=256, num_blocks=64))
    graphs = DecodeGraphs(engine.model, engine.kv_caches, max_num_seqs=2, max_model_len=256,
                          max_blocks_per_seq=engine.builder.block_tables.shape[1])  # fmt: skip

    class Stale:
        def replay(self) -> None:  # leaves whatever the output buffer held
            pass

    hidden = engine.model.embed_tokens.shape[1]  # type: ignore[attr-defined]
    for size in graphs.sizes:
        graphs.graphs[size] = Stale()  # type: ignore[assignment]
        graphs.outputs[size] = torch.full((size, hidden), 1e4)
    engine.graphs = graphs
    eager = generate(build_engine(smollm, EngineOptions(max_model_len=256, num_blocks=64)), [4])
    assert generate(engine, [4]) == eager  # the checked step returned the eager result
    assert not graphs.enabled and graphs.bucket(1) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_match_eager_on_cuda(smollm: LoadedModel) -> None:
    opts = EngineOptions(device="cuda", max_model_len=512, num_blocks=256, max_num_seqs=16)
    with_graphs = build_engine(smollm, opts)
    assert with_graphs.graphs is not None
    lengths = [20, 5, 13, 1, 30, 8, 17, 2]
    eager_opts = EngineOptions(device="cuda", max_model_len=512, num_blocks=256,
                               max_num_seqs=16, cuda_graphs=False)  # fmt: skip
    assert generate(with_graphs, lengths) == generate(build_engine(smollm, eager_opts), lengths)
    assert with_graphs.graphs.enabled  # type: ignore[attr-defined]
