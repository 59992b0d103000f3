"""Paged decode and prefill attention: Triton kernels against the torch reference.

Caches are random, block tables are random permutations of the cache's blocks (so a sequence's
rows are scattered), and table entries past a sequence's last block are poisoned with huge ids:
a kernel that read them would fault or produce garbage.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import assert_close

from helixflow.kernels import decode_attention as tri_decode
from helixflow.kernels import prefill_attention as tri_prefill
from helixflow.kernels.reference import attention as ref

POISON = 2**30  # a block id far outside any cache


def make_cache(
    rng: torch.Generator,
    seq_lens: list[int],
    *,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and scattered block tables for sequences of ``seq_lens`` tokens."""
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=rng).to(dtype)
    value_cache = torch.randn(shape, generator=rng).to(dtype)
    perm = torch.randperm(num_blocks, generator=rng).tolist()
    width = max(needed, default=0) + 2
    tables = torch.full((len(seq_lens), width), POISON, dtype=torch.int32)
    for i, n in enumerate(needed):
        tables[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return key_cache.to(device), value_cache.to(device), tables.to(device), lens.to(device)


def _id(layout: tuple[int, int, int, int]) -> str:
    return "h{}-kv{}-d{}-bs{}".format(*layout)


# (num_heads, num_kv_heads, head_dim, block_size): GQA ratios 1/4/8, MQA, every head size.
LAYOUTS = [
    (4, 4, 64, 16),
    (8, 2, 80, 16),
    (16, 2, 96, 8),
    (12, 3, 128, 16),
    (8, 1, 256, 32),
    (6, 2, 64, 1),  # block of one token, group of 3 (not a power of two)
]
# Every layout in fp32; each layout once more in one of the half types (the interpreter is slow).
LAYOUT_DTYPES = [pytest.param(lay, torch.float32, id=f"{_id(lay)}-fp32") for lay in LAYOUTS]
LAYOUT_DTYPES += [
    pytest.param(layout, dtype, id=f"{_id(layout)}-{str(dtype)[6:]}")
    for layout, dtype in zip(LAYOUTS, [torch.float16, torch.bfloat16] * 3, strict=True)
]
# Lengths around block boundaries, a single token, an idle (zero) row and a long sequence.
DECODE_LENS = [[1], [15, 16, 17], [0, 33, 7], [31, 32, 33, 64, 65], [300]]


@pytest.mark.parametrize(("layout", "dtype"), LAYOUT_DTYPES)
def test_decode_matches_reference(
    layout: tuple[int, int, int, int], dtype: torch.dtype, device: str, rng: torch.Generator
) -> None:
    num_heads, num_kv_heads, head_dim, block_size = layout
    for seq_lens in DECODE_LENS:
        kc, vc, bt, lens = make_cache(rng, seq_lens, num_kv_heads=num_kv_heads,
                                      head_dim=head_dim, block_size=block_size, dtype=dtype,
                                      device=device)  # fmt: skip
        q = torch.randn(len(seq_lens), num_heads, head_dim, generator=rng).to(dtype).to(device)
        scale = 1 / math.sqrt(head_dim)
        expected = ref.paged_decode_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens.cpu(),
                                              scale=scale)  # fmt: skip
        got = tri_decode.paged_decode_attention(q, kc, vc, bt, lens, scale=scale)
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 13])
@pytest.mark.parametrize("sliding_window", [None, 1, 40, 500])
def test_decode_split_k_and_sliding_window(
    num_splits: int, sliding_window: int | None, device: str, rng: torch.Generator
) -> None:
    seq_lens = [1, 50, 257, 400]
    kc, vc, bt, lens = make_cache(rng, seq_lens, num_kv_heads=2, head_dim=64, block_size=16,
                                  dtype=torch.float32, device=device)  # fmt: skip
    q = torch.randn(len(seq_lens), 8, 64, generator=rng).to(device)
    expected = ref.paged_decode_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens.cpu(),
                                          scale=0.125, sliding_window=sliding_window)  # fmt: skip
    got = tri_decode.paged_decode_attention(q, kc, vc, bt, lens, scale=0.125,
                                            sliding_window=sliding_window,
                                            num_splits=num_splits)  # fmt: skip
    assert_close(got, expected, torch.float32)


def test_decode_into_strided_views(device: str, rng: torch.Generator) -> None:
    """q sliced out of a fused qkv output, out written into a wider buffer."""
    seq_lens = [5, 19]
    kc, vc, bt, lens = make_cache(rng, seq_lens, num_kv_heads=2, head_dim=64, block_size=16,
                                  dtype=torch.float16, device=device)  # fmt: skip
    qkv = torch.randn(2, 12, 64, generator=rng).half().to(device)  # 8 q + 2 k + 2 v heads
    q = qkv[:, :8]
    out_buf = torch.full((2, 10, 64), 7.0, dtype=torch.float16, device=device)
    out = out_buf[:, 1:9]
    tri_decode.paged_decode_attention(q, kc, vc, bt, lens, scale=0.125, out=out)
    expected = ref.paged_decode_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens.cpu(),
                                          scale=0.125)  # fmt: skip
    assert_close(out, expected, torch.float16)
    assert bool((out_buf[:, 0] == 7).all()) and bool((out_buf[:, 9] == 7).all())


def test_split_choice_fills_the_gpu_and_respects_short_contexts() -> None:
    dev = torch.device("cpu")  # the interpreter's stand-in GPU has 4 SMs
    assert tri_decode.choose_num_splits(1, 1, dev) == 8
    assert tri_decode.choose_num_splits(256, 8, dev) == 1
    assert tri_decode.choose_num_splits(1, 1, dev, max_seq_len=100) == 1
    assert tri_decode.choose_num_splits(1, 1, dev, max_seq_len=600) == 3


def _query_start_loc(query_lens: list[int], device: str) -> torch.Tensor:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)


# (cached prefix, chunk) per sequence: plain prompts, chunks after a cached prefix, a decode row,
# chunks ending at a block boundary +- 1, an idle sequence with an empty chunk.
PREFILL_BATCHES = [
    [(0, 1)],
    [(0, 17), (16, 16), (31, 2), (5, 1)],
    [(0, 70), (48, 33), (0, 0), (100, 3)],
]


@pytest.mark.parametrize(("layout", "dtype"), LAYOUT_DTYPES)
def test_prefill_matches_reference(
    layout: tuple[int, int, int, int], dtype: torch.dtype, device: str, rng: torch.Generator
) -> None:
    num_heads, num_kv_heads, head_dim, block_size = layout
    for batch in PREFILL_BATCHES:
        seq_lens = [ctx + n for ctx, n in batch]
        kc, vc, bt, lens = make_cache(rng, seq_lens, num_kv_heads=num_kv_heads,
                                      head_dim=head_dim, block_size=block_size, dtype=dtype,
                                      device=device)  # fmt: skip
        qsl = _query_start_loc([n for _, n in batch], device)
        num_tokens = int(qsl[-1]) + 2  # two padded rows at the end
        q = torch.randn(num_tokens, num_heads, head_dim, generator=rng).to(dtype).to(device)
        scale = 1 / math.sqrt(head_dim)
        expected = ref.paged_prefill_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens.cpu(),
                                               qsl.cpu(), scale=scale)  # fmt: skip
        out = torch.full_like(q, 3.0)
        tri_prefill.paged_prefill_attention(q, kc, vc, bt, lens, qsl, scale=scale, out=out)
        real = int(qsl[-1])
        assert_close(out[:real], expected[:real], dtype)
        assert bool((out[real:] == 3.0).all()), "padded rows must not be written"


@pytest.mark.parametrize("sliding_window", [1, 5, 64, 1000])
def test_prefill_sliding_window(sliding_window: int, device: str, rng: torch.Generator) -> None:
    batch = [(0, 90), (40, 30), (7, 1)]
    seq_lens = [ctx + n for ctx, n in batch]
    kc, vc, bt, lens = make_cache(rng, seq_lens, num_kv_heads=2, head_dim=64, block_size=16,
                                  dtype=torch.float32, device=device)  # fmt: skip
    qsl = _query_start_loc([n for _, n in batch], device)
    q = torch.randn(int(qsl[-1]), 4, 64, generator=rng).to(device)
    expected = ref.paged_prefill_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens.cpu(),
                                           qsl.cpu(), scale=0.125,
                                           sliding_window=sliding_window)  # fmt: skip
    got = tri_prefill.paged_prefill_attention(q, kc, vc, bt, lens, qsl, scale=0.125,
                                              sliding_window=sliding_window,
                                              max_query_len=90)  # fmt: skip
    assert_close(got, expected, torch.float32)


def test_decode_equals_prefill_with_one_query_token(device: str, rng: torch.Generator) -> None:
    seq_lens = [1, 16, 130]
    kc, vc, bt, lens = make_cache(rng, seq_lens, num_kv_heads=2, head_dim=128, block_size=16,
                                  dtype=torch.float32, device=device)  # fmt: skip
    q = torch.randn(3, 8, 128, generator=rng).to(device)
    qsl = _query_start_loc([1, 1, 1], device)
    a = tri_decode.paged_decode_attention(q, kc, vc, bt, lens, scale=0.1, num_splits=3)
    b = tri_prefill.paged_prefill_attention(q, kc, vc, bt, lens, qsl, scale=0.1)
    assert_close(a, b, torch.float32)


def test_reference_matches_dense_causal_sdpa(rng: torch.Generator) -> None:
    """The reference itself, against SDPA on contiguous K/V rebuilt from the block tables."""
    batch = [(0, 9), (12, 5), (30, 1)]
    seq_lens = [ctx + n for ctx, n in batch]
    kc, vc, bt, lens = make_cache(rng, seq_lens, num_kv_heads=2, head_dim=32, block_size=4,
                                  dtype=torch.float32, device="cpu")  # fmt: skip
    qsl = _query_start_loc([n for _, n in batch], "cpu")
    q = torch.randn(int(qsl[-1]), 6, 32, generator=rng)
    got = ref.paged_prefill_attention(q, kc, vc, bt, lens, qsl, scale=0.2)
    for s, (ctx, n) in enumerate(batch):
        total = ctx + n
        rows = [int(bt[s, t // 4]) * 4 + t % 4 for t in range(total)]
        k = kc.view(-1, 2, 32)[rows].repeat_interleave(3, dim=1).transpose(0, 1)
        v = vc.view(-1, 2, 32)[rows].repeat_interleave(3, dim=1).transpose(0, 1)
        qs = q[int(qsl[s]) : int(qsl[s + 1])].transpose(0, 1)  # [heads, n, dim]
        mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=ctx)
        want = torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=mask,
                                                                 scale=0.2)  # fmt: skip
        torch.testing.assert_close(got[int(qsl[s]) : int(qsl[s + 1])], want.transpose(0, 1))


def _decode_args(device: str) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    kc, vc, bt, lens = make_cache(g, [5, 9], num_kv_heads=2, head_dim=64, block_size=16,
                                  dtype=torch.float32, device=device)  # fmt: skip
    q = torch.randn(2, 4, 64, device=device)
    return {"q": q, "key_cache": kc, "value_cache": vc, "block_tables": bt, "seq_lens": lens}


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("q", lambda a: a["q"][0], "q must have 3 dimensions"),
        ("q", lambda a: a["q"].half(), "key_cache must have dtype float16"),
        ("q", lambda a: torch.zeros(2, 3, 64, device=a["q"].device), "multiple of"),
        ("q", lambda a: torch.zeros(2, 4, 32, device=a["q"].device), "head_dim"),
        ("q", lambda a: a["q"].transpose(1, 2), "q must have unit stride"),
        ("value_cache", lambda a: a["value_cache"][:, :8].contiguous(), "value_cache shape"),
        ("block_tables", lambda a: a["block_tables"].float(), "block_tables must have dtype"),
        ("block_tables", lambda a: a["block_tables"][:1], "block_tables has 1 rows"),
        ("seq_lens", lambda a: a["seq_lens"][:1], "seq_lens has 1 entries"),
        ("seq_lens", lambda a: [5, 9], "seq_lens must be a torch.Tensor"),
    ],
)
def test_decode_bad_arguments_name_the_argument(
    field: str, bad: object, message: str, device: str
) -> None:
    args = _decode_args(device)
    args[field] = bad(args)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        tri_decode.paged_decode_attention(**args, scale=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 0.0}, "scale must be"),
        ({"scale": float("nan")}, "scale must be"),
        ({"scale": 0.1, "sliding_window": 0}, "sliding_window"),
        ({"scale": 0.1, "num_splits": 0}, "num_splits"),
        ({"scale": 0.1, "out": torch.empty(2, 4, 63)}, "out must have shape"),
    ],
)
def test_decode_bad_options(kwargs: dict[str, object], message: str, device: str) -> None:
    args = _decode_args(device)
    if "out" in kwargs:
        kwargs = {**kwargs, "out": kwargs["out"].to(device)}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=message):
        tri_decode.paged_decode_attention(**args, **kwargs)  # type: ignore[arg-type]


def test_prefill_bad_arguments(device: str) -> None:
    args = _decode_args(device)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="query_start_loc must have dtype"):
        tri_prefill.paged_prefill_attention(**args, query_start_loc=qsl.float(), scale=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_tables has 2 rows for 1 sequences"):
        tri_prefill.paged_prefill_attention(**args, query_start_loc=qsl[:2], scale=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_query_len"):
        tri_prefill.paged_prefill_attention(**args, query_start_loc=qsl, scale=0.1,
                                            max_query_len=-1)  # type: ignore[arg-type]  # fmt: skip


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _decode_args("cpu")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        tri_decode.paged_decode_attention(**args, scale=0.1)  # type: ignore[arg-type]
