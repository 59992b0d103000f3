"""LLMEngine end to end on the real SmolLM2-135M-Instruct weights (CPU, fp32).

Real answers, batch invariance (alone / in a batch of 32 / preempted under a tiny KV budget /
from the prefix cache), seeded sampling, stop strings, logprobs, abort and the async front.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from helixflow.errors import InvalidRequestError
from helixflow.pool.async_engine import AsyncLLMEngine
from helixflow.pool.llm_engine import LLMEngine, RequestOutput
from helixflow.pool.models.loader import LoadedModel
from helixflow.pool.runner import EngineOptions, build_engine
from helixflow.pool.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.", "What is the boiling point of water in Celsius?",
    "List two planets of the solar system.",
]  # fmt: skip


def run_all(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def token_ids(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def text(outs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outs)


@pytest.fixture(scope="module")
def engine(smollm: LoadedModel) -> LLMEngine:
    return build_engine(smollm, EngineOptions(max_model_len=1024, num_blocks=512))


def chat(engine: LLMEngine, question: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": question}])  # type: ignore[attr-defined,no-any-return]


def test_answers_the_capital_of_france(engine: LLMEngine) -> None:
    engine.add_request("q", chat(engine, QUESTIONS[0]), SamplingParams(temperature=0,
                                                                       max_tokens=24))  # fmt: skip
    outs = run_all(engine)["q"]
    assert "Paris" in text(outs)
    assert outs[-1].finished and outs[-1].finish_reason == "stop"  # EOS, not the length cap


def test_greedy_output_is_batch_invariant(smollm: LoadedModel, engine: LLMEngine) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    probe = chat(engine, QUESTIONS[1])
    engine.add_request("alone", probe, greedy)
    alone = token_ids(run_all(engine)["alone"])

    # In a batch of 32 with different prompts and lengths, arriving together.
    for i in range(31):
        engine.add_request(f"o{i}", chat(engine, QUESTIONS[i % 8] + " " * (i % 5)), greedy)
    engine.add_request("batched", probe, greedy)
    batched = run_all(engine)
    assert token_ids(batched["batched"]) == alone

    # Again: now the prompt's full blocks come from the prefix cache.
    engine.add_request("cached", probe, greedy)
    assert token_ids(run_all(engine)["cached"]) == alone

    # A KV budget so small that the 8 requests preempt each other (recompute) as they grow.
    tiny = build_engine(smollm, EngineOptions(max_model_len=128, num_blocks=12,
                                              max_num_batched_tokens=128))  # fmt: skip
    for i in range(7):
        tiny.add_request(f"t{i}", chat(tiny, QUESTIONS[i]), greedy)
    tiny.add_request("tiny", probe, greedy)
    outs = run_all(tiny)
    assert tiny.scheduler.stats()["num_preemptions"] > 0
    assert token_ids(outs["tiny"]) == alone


def test_seeded_sampling_is_reproducible_and_batch_invariant(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=1234, max_tokens=12,
                            ignore_eos=True)  # fmt: skip
    prompt = chat(engine, "Tell me a story.")
    engine.add_request("s1", prompt, params)
    first = token_ids(run_all(engine)["s1"])
    for i in range(5):
        engine.add_request(f"n{i}", chat(engine, QUESTIONS[i]), SamplingParams(temperature=0.8))
    engine.add_request("s2", prompt, params)
    assert token_ids(run_all(engine)["s2"]) == first
    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=99, max_tokens=12,
                           ignore_eos=True)  # fmt: skip
    engine.add_request("s3", prompt, other)
    assert token_ids(run_all(engine)["s3"]) != first


def by_choice(outs: list[RequestOutput]) -> dict[int, list[int]]:
    choices: dict[int, list[int]] = {}
    for o in outs:
        choices.setdefault(o.index, []).extend(o.new_token_ids)
    return choices


def test_n_choices_share_the_prompt_and_match_separate_requests(smollm: LoadedModel) -> None:
    """n = 3 forks two children off the prompt's KV blocks (copy-on-write). Each choice must
    equal the same choice computed with no sharing at all (max_num_seqs = 1 leaves no room to
    fork, so the children run as requests of their own): broken sharing or a missed block copy
    would change the tokens. Choice 0 draws what an n = 1 request with the seed draws."""
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True, n=3)
    shared = build_engine(smollm, EngineOptions(max_model_len=256, num_blocks=64))
    prompt = chat(shared, "Write a short poem about the sea.")
    assert len(prompt) % 16 != 0  # the last prompt block is partly filled: shared, then copied
    shared.add_request("p", prompt, params)
    blocks = -(-len(prompt) // 16)
    first = shared.step()  # the whole prompt, then every choice's first token
    # the prompt's blocks are held once (the children share them), not three times
    assert shared.scheduler.allocator.num_used_blocks == blocks
    got = by_choice(first + run_all(shared)["p"])

    solo = build_engine(smollm, EngineOptions(max_model_len=256, num_blocks=64, max_num_seqs=1))
    solo.add_request("p", prompt, params)
    want = by_choice(run_all(solo)["p"])
    assert sorted(got) == sorted(want) == [0, 1, 2]
    assert all(len(v) == 20 for v in want.values())
    assert len({tuple(v) for v in want.values()}) == 3  # three different continuations
    solo.add_request("one", prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=20,
                                                   ignore_eos=True))  # fmt: skip
    assert token_ids(run_all(solo)["one"]) == want[0]
    assert got == want


def test_n_choices_finish_together_and_abort_together(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=6, n=2, ignore_eos=True)
    engine.add_request("two", chat(engine, QUESTIONS[3]), params)
    outs = run_all(engine)["two"]
    assert [o.request_finished for o in outs].count(True) == 1 and outs[-1].request_finished
    assert sorted(o.index for o in outs if o.finished) == [0, 1]
    engine.add_request("cut", chat(engine, QUESTIONS[3]), params)
    engine.step()
    assert engine.abort("cut") and not engine.has_unfinished()
    assert engine.scheduler.allocator.num_used_blocks == 0


def test_stop_strings_logprobs_and_lengths(engine: LLMEngine) -> None:
    prompt = chat(engine, "Count from 1 to 20, separated by commas.")
    engine.add_request("plain", prompt, SamplingParams(temperature=0, max_tokens=40))
    plain = text(run_all(engine)["plain"])
    assert "5" in plain, plain
    cut = plain.index("5")
    engine.add_request("stop", prompt, SamplingParams(temperature=0, max_tokens=40, stop=("5",),
                                                      logprobs=True, top_logprobs=3))  # fmt: skip
    outs = run_all(engine)["stop"]
    assert text(outs) == plain[:cut]
    assert outs[-1].finish_reason == "stop"
    for o in outs:
        (lp,) = o.logprobs
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
    engine.add_request("len", prompt, SamplingParams(temperature=0, max_tokens=3))
    outs = run_all(engine)["len"]
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 3


def test_abort_and_bad_requests(engine: LLMEngine) -> None:
    engine.add_request("gone", chat(engine, QUESTIONS[0]), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.abort("gone") and not engine.abort("gone")
    assert not engine.has_unfinished()
    assert engine.scheduler.allocator.num_used_blocks == 0
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request("long", [1] * 2000, SamplingParams())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("v", [10**9], SamplingParams())


def test_async_streams_and_cancellation(engine: LLMEngine) -> None:
    front = AsyncLLMEngine(engine)

    async def collect(rid: str, question: str, n: int) -> list[Any]:
        got = []
        async for out in front.generate(rid, chat(engine, question),
                                        SamplingParams(temperature=0, max_tokens=n)):  # fmt: skip
            got.append(out)
        return got

    async def cancel_early() -> None:
        stream = front.generate("c", chat(engine, QUESTIONS[2]), SamplingParams(max_tokens=200))
        async for _ in stream:
            break
        await stream.aclose()

    async def read(rid: str, delay: float) -> list[Any]:
        got = []
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        async for out in front.generate(rid, chat(engine, QUESTIONS[1]), params):
            got.append(out)
            await asyncio.sleep(delay if len(got) == 1 else 0)  # falls behind once
        return got

    async def main() -> tuple[list[Any], list[Any]]:
        a, b, _ = await asyncio.gather(
            collect("a", QUESTIONS[0], 24), collect("b", QUESTIONS[4], 6), cancel_early()
        )
        return a, b

    try:
        slow = asyncio.run(read("slow", 0.5))
        assert len(token_ids(slow)) == 16 and len(slow) < 16  # what piled up came merged
        assert token_ids(slow) == token_ids(asyncio.run(read("fast", 0.0)))
        a, b = asyncio.run(main())
        assert "Paris" in text(a) and a[-1].finished
        assert b[-1].finished and len(token_ids(b)) <= 6
        for _ in range(50):  # the abort lands at the engine's next drain
            if not engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not engine.has_unfinished()
    finally:
        front.shutdown()
    assert not front.healthy
