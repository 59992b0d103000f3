"""Greedy parity with Hugging Face transformers on the real SmolLM2-135M-Instruct weights.

HF's ``LlamaForCausalLM`` gets the very tensors HelixFlow's loader produced from the GGUF file
(the loader's q/k un-permutation is checked against transformers' own GGUF reader in
tests/pool/models/test_gguf_loader.py); each prompt then runs through HF ``generate`` alone, and
through HelixFlow's engine with all 20 prompts in flight together (chunked prefill, paged KV
cache, continuous batching). The greedy tokens must be identical.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_engine import hf_model

from helixflow.pool.models.loader import LoadedModel
from helixflow.pool.runner import EngineOptions, build_engine
from helixflow.pool.sampling_params import SamplingParams

NEW_TOKENS = 16
PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.",
    "Write a haiku about autumn.", "What is 7 plus 5?", "Name a famous painter.",
    "How many legs does a spider have?", "Give me a tip for learning Python.",
    "What is the largest ocean?", "Say hello in French.", "Why is the sky blue?",
    "List three fruits.", "What does CPU stand for?", "Who was Albert Einstein?",
    "Describe a cat in five words.", "What is the opposite of cold?",
    "Recommend a book for children.", "What is the square root of 81?",
    "Tell me a fun fact about octopuses.", "How do I boil an egg?",
    "What language is spoken in Brazil?",
]  # fmt: skip


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(smollm: LoadedModel, transformers_offline: Any) -> None:
    tok = smollm.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]

    hf = hf_model(smollm, transformers_offline)
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              min_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
            expected.append(out[0, len(ids) :].tolist())

    engine = build_engine(smollm, EngineOptions(max_model_len=512, num_blocks=256,
                                                max_num_batched_tokens=256))  # fmt: skip
    # NOTE: HF's min_new_tokens masks EOS; min_tokens is the same rule here.
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, greedy)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    mismatches = [i for i in range(len(prompts)) if got[str(i)] != expected[i]]
    assert not mismatches, [(PROMPTS[i], got[str(i)], expected[i]) for i in mismatches]
