"""``_native.paged_decode_attention`` against a numpy reference (runs under ASan/UBSan too)."""

from __future__ import annotations

import numpy as np
import pytest

from helixflow import _native


def reference(q, key_cache, value_cache, tables, seq_lens, scale, window):
    """Plain softmax attention of each sequence's one query over its keys, in float64."""
    num_seqs, num_heads, _ = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = np.zeros(q.shape, dtype=np.float64)
    for s in range(num_seqs):
        n = int(seq_lens[s])
        start = max(0, n - window) if window else 0
        pos = np.arange(start, n)
        blocks = tables[s, pos // block_size]
        for h in range(num_heads):
            k = key_cache[blocks, pos % block_size, h // group].astype(np.float64)  # [n, D]
            v = value_cache[blocks, pos % block_size, h // group].astype(np.float64)
            if n == 0:
                continue
            scores = k @ q[s, h].astype(np.float64) * scale
            p = np.exp(scores - scores.max())
            out[s, h] = p @ v / p.sum()
    return out


def make_case(rng, num_seqs, num_heads, num_kv_heads, head_dim, block_size, lens, width=None):
    width = width or max(1, -(-max(lens) // block_size))
    num_blocks = num_seqs * width + 3
    key_cache = rng.standard_normal((num_blocks, block_size, num_kv_heads, head_dim), np.float32)
    value_cache = rng.standard_normal(key_cache.shape, np.float32)
    tables = rng.permutation(num_blocks)[: num_seqs * width].reshape(num_seqs, width)
    q = rng.standard_normal((num_seqs, num_heads, head_dim), np.float32)
    return q, key_cache, value_cache, tables.astype(np.int32), np.array(lens, np.int32)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size", "lens", "window"),
    [
        (4, 4, 64, 16, [1, 15, 16, 17, 33], 0),  # MHA, block boundary +- 1
        (9, 3, 64, 16, [200, 7, 64, 1], 0),  # SmolLM2's shape
        (8, 1, 128, 8, [31, 9], 0),  # MQA
        (32, 8, 80, 16, [100, 3], 0),  # head size not a multiple of 16
        (8, 2, 96, 4, [50, 12, 13], 10),  # sliding window
        (4, 2, 256, 16, [0, 5], 0),  # an empty sequence gets zeros
    ],
)
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_matches_reference(
    num_heads, num_kv_heads, head_dim, block_size, lens, window, num_threads
):
    rng = np.random.default_rng(len(lens) * 100 + head_dim)
    q, kc, vc, tables, seq_lens = make_case(
        rng, len(lens), num_heads, num_kv_heads, head_dim, block_size, lens
    )
    scale = head_dim**-0.5
    out = np.full(q.shape, np.nan, np.float32)
    _native.paged_decode_attention(q, kc, vc, tables, seq_lens, scale, window, out, num_threads)
    np.testing.assert_allclose(out, reference(q, kc, vc, tables, seq_lens, scale, window),
                               rtol=2e-5, atol=2e-6)  # fmt: skip


def test_strided_query_and_output_and_stale_table_entries() -> None:
    """q and out as views into wider rows (as in a fused qkv tensor); table entries past a
    sequence's last block are garbage and must not be read."""
    rng = np.random.default_rng(1)
    q, kc, vc, tables, seq_lens = make_case(rng, 3, 6, 2, 64, 16, [20, 3, 40], width=5)
    tables[1, 1:] = -7  # a 3-token sequence reads only its first block
    wide = rng.standard_normal((3, 10, 64), np.float32)
    wide[:, 2:8] = q
    out_wide = np.zeros((3, 9, 64), np.float32)
    _native.paged_decode_attention(wide[:, 2:8], kc, vc, tables, seq_lens, 0.125, 0,
                                   out_wide[:, 3:], 2)  # fmt: skip
    np.testing.assert_allclose(out_wide[:, 3:], reference(q, kc, vc, tables, seq_lens, 0.125, 0),
                               rtol=2e-5, atol=2e-6)  # fmt: skip
    assert not out_wide[:, :3].any()


def test_result_does_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(2)
    q, kc, vc, tables, seq_lens = make_case(rng, 32, 9, 3, 64, 16, list(range(5, 325, 10)))
    out = np.zeros(q.shape, np.float32)
    _native.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125, 0, out, 2)
    alone = np.zeros(q[7:8].shape, np.float32)
    _native.paged_decode_attention(q[7:8], kc, vc, tables[7:8], seq_lens[7:8], 0.125, 0, alone, 1)
    assert np.array_equal(alone[0], out[7])


def _args() -> dict[str, object]:
    rng = np.random.default_rng(3)
    q, kc, vc, tables, seq_lens = make_case(rng, 2, 4, 2, 64, 16, [20, 5])
    return {"q": q, "key_cache": kc, "value_cache": vc, "block_tables": tables,
            "seq_lens": seq_lens, "scale": 0.125, "sliding_window": 0,
            "out": np.zeros(q.shape, np.float32)}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("q", np.zeros((2, 4, 64), np.float64), "q must be float32"),
        ("q", np.zeros((2, 4, 64, 1), np.float32), "q must have 3 dimensions"),
        ("q", np.zeros((2, 4, 128), np.float32)[:, :, ::2], "q must have a unit last stride"),
        ("key_cache", np.zeros((9, 16, 2, 128), np.float32)[..., ::2], "key_cache must be contig"),
        ("value_cache", np.zeros((9, 16, 2, 32), np.float32), "value_cache: expected key_cache"),
        ("block_tables", np.zeros((2, 2), np.int64), "block_tables must be int32"),
        ("block_tables", np.zeros((3, 2), np.int32), "block_tables: expected num_seqs"),
        ("seq_lens", np.array([20, 5, 1], np.int32), "seq_lens: expected num_seqs"),
        ("seq_lens", np.array([20, 33], np.int32), r"seq_lens\[1\] = 33 does not fit"),
        ("seq_lens", np.array([20, -1], np.int32), r"seq_lens\[1\] = -1"),
        ("out", np.zeros((2, 4, 32), np.float32), "out: expected q's shape"),
        ("sliding_window", -1, "sliding_window must be >= 0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(
    name: str, value: object, message: str
) -> None:
    args = _args()
    args[name] = value
    with pytest.raises(ValueError, match=message):
        _native.paged_decode_attention(**args)


def test_bad_block_id_and_read_only_output_are_refused_before_writing() -> None:
    args = _args()
    tables = args["block_tables"]
    assert isinstance(tables, np.ndarray)
    tables[0, 1] = 10_000
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\] = 10000 is not a block"):
        _native.paged_decode_attention(**args)
    assert not np.asarray(args["out"]).any()
    args = _args()
    out = np.asarray(args["out"])
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        _native.paged_decode_attention(**args)
    args = _args()
    args["q"] = np.zeros((2, 3, 64), np.float32)
    args["out"] = np.zeros((2, 3, 64), np.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        _native.paged_decode_attention(**args)
