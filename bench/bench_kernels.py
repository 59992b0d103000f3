"""Kernel benchmark: every Triton kernel vs its torch reference, at an 8B-class model's shapes.

Method: ``triton.testing.do_bench`` (median ms over its repetitions, L2 flushed between them)
for the Triton kernel, its torch reference and, for attention, torch's
``scaled_dot_product_attention`` on dense contiguous K/V (SDPA's best case: no paging). Shapes
are Llama-3-8B's: 32 query heads, 8 KV heads, head size 128, hidden 4096, MLP 14336, vocab
128256, bf16, 16-token KV blocks scattered over the cache.

Achieved bandwidth = bytes a kernel must move (inputs read once + outputs written) / time. The
baseline is measured in the same run: a device-to-device copy of 2 GiB (``torch.Tensor.copy_``),
the bandwidth a memory-bound kernel can hope for; figures are given as a fraction of it and of
the GPU's datasheet bandwidth when the GPU is known. Prefill attention is compute-bound and is
reported in TFLOP/s.

Target (issue 3): paged decode attention >= 80 % of the memory bandwidth at batch >= 32 and
context >= 4k.

    python bench/bench_kernels.py              # needs a CUDA GPU
    python bench/bench_kernels.py --quick      # fewer shapes
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke   # CPU: plumbing check only
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128256
BLOCK_SIZE = 16
# Datasheet HBM bandwidth in GB/s by device-name fragment (first match wins).
DATASHEET_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0)]


def bench(fn: Callable[[], Any], smoke: bool) -> float:
    """Median milliseconds of ``fn``: do_bench on a GPU, one wall-clock call in smoke mode."""
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


class Report:
    """Rows of one markdown table, printed as they come."""

    def __init__(self, copy_gbps: float, datasheet_gbps: float | None) -> None:
        self.copy_gbps = copy_gbps
        self.datasheet_gbps = datasheet_gbps
        print(
            "| kernel | shape | triton ms | torch ref ms | SDPA ms | vs ref | GB/s | "
            "% of copy BW | % of datasheet | TFLOP/s |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(
        self,
        kernel: str,
        shape: str,
        ms: float,
        ref_ms: float | None,
        *,
        nbytes: float,
        sdpa_ms: float | None = None,
        flops: float | None = None,
    ) -> None:
        gbps = nbytes / ms / 1e6
        sheet = f"{100 * gbps / self.datasheet_gbps:.0f} %" if self.datasheet_gbps else "n/a"
        cells = [
            kernel,
            shape,
            f"{ms:.4f}",
            "n/a" if ref_ms is None else f"{ref_ms:.4f}",
            "" if sdpa_ms is None else f"{sdpa_ms:.4f}",
            "n/a" if ref_ms is None else f"{ref_ms / ms:.1f}x",
            f"{gbps:.0f}",
            f"{100 * gbps / self.copy_gbps:.0f} %",
            sheet,
            "" if flops is None else f"{flops / ms / 1e9:.1f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


def measure_copy_gbps(device: torch.device, smoke: bool) -> float:
    n = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16 on a GPU
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), smoke)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def paged_cache(
    batch: int, context: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches holding ``batch`` sequences of ``context`` tokens in shuffled blocks."""
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.empty(shape, dtype=dtype, device=device).normal_()
    value_cache = torch.empty(shape, dtype=dtype, device=device).normal_()
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return key_cache, value_cache, tables, seq_lens


def bench_decode(rep: Report, k: Any, r: Any, device: torch.device, sizes: list[tuple[int, int]],
                 smoke: bool) -> None:  # fmt: skip
    for batch, context in sizes:
        _bench_decode_one(rep, k, r, device, batch, context, smoke)


def _bench_decode_one(rep: Report, k: Any, r: Any, device: torch.device, batch: int,
                      context: int, smoke: bool) -> None:  # fmt: skip
    dtype = torch.bfloat16
    esize = torch.finfo(dtype).bits // 8
    kc, vc, bt, lens = paged_cache(batch, context, dtype, device)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=dtype, device=device)
    scale = HEAD_DIM**-0.5
    ms = bench(lambda: k.paged_decode_attention(q, kc, vc, bt, lens, scale=scale,
                                                max_seq_len=context), smoke)  # fmt: skip
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * esize
    nbytes = kv_bytes + 2 * q.numel() * esize + bt.numel() * 4
    ref_ms = None
    if smoke or batch * context <= 64 * 1024:  # the fp32 reference copies all of K/V
        ref_ms = bench(lambda: r.paged_decode_attention(q, kc, vc, bt, lens, scale=scale),
                       smoke)  # fmt: skip
    dense_k = torch.empty(batch, NUM_KV_HEADS, context, HEAD_DIM, dtype=dtype, device=device)
    dense_v = torch.empty_like(dense_k)
    q4 = q.view(batch, NUM_HEADS, 1, HEAD_DIM)
    sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, dense_k, dense_v, scale=scale, enable_gqa=True), smoke)  # fmt: skip
    rep.row("paged_decode_attention", f"batch {batch}, context {context}", ms, ref_ms,
            nbytes=nbytes, sdpa_ms=sdpa_ms)  # fmt: skip


def bench_prefill(rep: Report, k: Any, r: Any, device: torch.device,
                  sizes: list[tuple[int, int, int]], smoke: bool) -> None:  # fmt: skip
    for num_seqs, prefix, chunk in sizes:
        _bench_prefill_one(rep, k, r, device, num_seqs, prefix, chunk, smoke)


def _bench_prefill_one(rep: Report, k: Any, r: Any, device: torch.device, num_seqs: int,
                       prefix: int, chunk: int, smoke: bool) -> None:  # fmt: skip
    dtype = torch.bfloat16
    esize = 2
    kc, vc, bt, lens = paged_cache(num_seqs, prefix + chunk, dtype, device)
    qsl = torch.arange(0, (num_seqs + 1) * chunk, chunk, dtype=torch.int32, device=device)
    q = torch.randn(num_seqs * chunk, NUM_HEADS, HEAD_DIM, dtype=dtype, device=device)
    scale = HEAD_DIM**-0.5
    ms = bench(lambda: k.paged_prefill_attention(q, kc, vc, bt, lens, qsl, scale=scale,
                                                 max_query_len=chunk), smoke)  # fmt: skip
    ref_ms = None
    if smoke or num_seqs * (prefix + chunk) <= 8192:
        ref_ms = bench(lambda: r.paged_prefill_attention(q, kc, vc, bt, lens, qsl,
                                                         scale=scale), smoke)  # fmt: skip
    # Causal attention of `chunk` queries over `prefix + chunk` keys: 4 * d flops per pair.
    pairs = num_seqs * NUM_HEADS * (chunk * prefix + chunk * (chunk + 1) / 2)
    flops = 4 * HEAD_DIM * pairs
    total = prefix + chunk
    dense_q = q.view(num_seqs, chunk, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    dense_k = torch.empty(num_seqs, NUM_KV_HEADS, total, HEAD_DIM, dtype=dtype, device=device)
    dense_v = torch.empty_like(dense_k)
    mask = None
    if prefix:  # SDPA's is_causal aligns to the top left; a prefix needs an explicit mask
        mask = torch.ones(chunk, total, dtype=torch.bool, device=device).tril(prefix)
    sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        dense_q, dense_k, dense_v, attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=True), smoke)  # fmt: skip
    nbytes = (2 * q.numel() + 2 * num_seqs * total * NUM_KV_HEADS * HEAD_DIM) * esize
    rep.row("paged_prefill_attention", f"{num_seqs} seqs x {chunk} new + {prefix} cached",
            ms, ref_ms, nbytes=nbytes, sdpa_ms=sdpa_ms, flops=flops)  # fmt: skip


def bench_elementwise(rep: Report, k: Any, r: Any, device: torch.device, tokens: list[int],
                      smoke: bool) -> None:  # fmt: skip
    from helixflow.kernels.reference.rotary import rope_cos_sin_cache

    cache = rope_cos_sin_cache(HEAD_DIM, 8192, 500000.0, device=device)
    for t in tokens:
        _bench_elementwise_one(rep, k, r, device, t, cache, smoke)


def _bench_elementwise_one(rep: Report, k: Any, r: Any, device: torch.device, t: int,
                           cache: torch.Tensor, smoke: bool) -> None:  # fmt: skip
    dtype = torch.bfloat16
    e = 2
    x = torch.randn(t, HIDDEN, dtype=dtype, device=device)
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, dtype=dtype, device=device)
    shape = f"{t} tokens"
    for name, nbytes in (("rms_norm", 2 * x.numel() * e), ("fused_add_rms_norm",
                                                           4 * x.numel() * e)):  # fmt: skip
        args = (x, w, 1e-5) if name == "rms_norm" else (x, res, w, 1e-5)
        tri_ms = bench(lambda name=name, args=args: getattr(k, name)(*args), smoke)
        ref_ms = bench(lambda name=name, args=args: getattr(r, name)(*args), smoke)
        rep.row(name, shape, tri_ms, ref_ms, nbytes=nbytes)

    qkv = torch.randn(t, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    q, kk = qkv[:, :NUM_HEADS], qkv[:, NUM_HEADS : NUM_HEADS + NUM_KV_HEADS]
    pos = torch.randint(0, 8192, (t,), device=device)
    nbytes = 2 * (q.numel() + kk.numel()) * e + t * HEAD_DIM * 4
    rep.row("rotary_embedding", shape,
            bench(lambda: k.rotary_embedding(pos, q, kk, cache), smoke),
            bench(lambda: r.rotary_embedding(pos, q, kk, cache), smoke),
            nbytes=nbytes)  # fmt: skip

    gate_up = torch.randn(t, 2 * INTERMEDIATE, dtype=dtype, device=device)
    rep.row("silu_and_mul", shape, bench(lambda: k.silu_and_mul(gate_up), smoke),
            bench(lambda: r.silu_and_mul(gate_up), smoke),
            nbytes=1.5 * gate_up.numel() * e)  # fmt: skip

    kv_cache = torch.zeros(t // BLOCK_SIZE + 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                           dtype=dtype, device=device)  # fmt: skip
    v_cache = torch.zeros_like(kv_cache)
    vv = qkv[:, NUM_HEADS + NUM_KV_HEADS :]
    slots = torch.randperm(kv_cache.shape[0] * BLOCK_SIZE, device=device)[:t]
    rep.row("write_kv_cache", shape,
            bench(lambda: k.write_kv_cache(kk, vv, kv_cache, v_cache, slots), smoke),
            bench(lambda: r.write_kv_cache(kk, vv, kv_cache, v_cache, slots), smoke),
            nbytes=4 * kk.numel() * e + t * 8)  # fmt: skip


def bench_sampling(rep: Report, k: Any, r: Any, device: torch.device, batches: list[int],
                   vocab: int, smoke: bool) -> None:  # fmt: skip
    for b in batches:
        logits = torch.randn(b, vocab, device=device) * 4
        temp = torch.full((b,), 0.8, device=device)
        seeds = torch.arange(b, dtype=torch.int64, device=device)
        top_k = torch.full((b,), 50, dtype=torch.int32, device=device)
        top_p = torch.full((b,), 0.9, device=device)
        min_p = torch.full((b,), 0.05, device=device)
        every = {"top_k": top_k, "top_p": top_p, "min_p": min_p}
        for label, kw in (("temperature + min-p", {"min_p": min_p}), ("+ top-k + top-p", every)):
            ms = bench(lambda kw=kw, lg=logits, tp=temp, sd=seeds: k.sample(lg, tp, sd, **kw),
                       smoke)  # fmt: skip
            ref_ms = bench(lambda kw=kw, lg=logits, tp=temp, sd=seeds: r.sample(lg, tp, sd, **kw),
                           smoke)  # fmt: skip
            rep.row(f"sample ({label})", f"batch {b}, vocab {vocab}", ms, ref_ms,
                    nbytes=logits.numel() * 4)  # fmt: skip


OPS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "write_kv_cache",
       "paged_decode_attention", "paged_prefill_attention", "sample")  # fmt: skip


def implementations() -> tuple[SimpleNamespace, SimpleNamespace]:
    """(Triton, torch reference): each a namespace holding every op by name."""
    from helixflow.kernels import (
        activation,
        decode_attention,
        kv_cache,
        norm,
        prefill_attention,
        rotary,
        sampling,
    )
    from helixflow.kernels.reference import activation as r_activation
    from helixflow.kernels.reference import attention as r_attention
    from helixflow.kernels.reference import kv_cache as r_kv_cache
    from helixflow.kernels.reference import norm as r_norm
    from helixflow.kernels.reference import rotary as r_rotary
    from helixflow.kernels.reference import sampling as r_sampling

    triton_mods = (activation, decode_attention, kv_cache, norm, prefill_attention, rotary,
                   sampling)  # fmt: skip
    ref_mods = (r_activation, r_attention, r_kv_cache, r_norm, r_rotary, r_sampling)
    pick = lambda mods, op: next(getattr(m, op) for m in mods if hasattr(m, op))  # noqa: E731
    return (SimpleNamespace(**{op: pick(triton_mods, op) for op in OPS}),
            SimpleNamespace(**{op: pick(ref_mods, op) for op in OPS}))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, wall-clock timing: checks the script on CPU (with "
                             "TRITON_INTERPRET=1); its numbers mean nothing")  # fmt: skip
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_kernels: no CUDA GPU here; the GPU figures are still to be measured "
              "(run with --smoke for a CPU plumbing check)")  # fmt: skip
        return 0
    if args.smoke and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and \
            not torch.cuda.is_available():  # fmt: skip
        print("bench_kernels: --smoke on CPU needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    tri, ref = implementations()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    sheet = next((bw for frag, bw in DATASHEET_GBPS if frag in gpu), None)
    import triton

    print(f"# bench_kernels: {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"# command: python bench/bench_kernels.py {' '.join(argv or sys.argv[1:])}".rstrip())
    copy_gbps = measure_copy_gbps(device, args.smoke)
    print(f"# baseline: device-to-device copy {copy_gbps:.0f} GB/s"
          + (f" (datasheet {sheet:.0f} GB/s)" if sheet else "") + "\n")  # fmt: skip
    rep = Report(copy_gbps, sheet)

    if args.smoke:
        decode = [(2, 40)]
        prefill = [(1, 8, 24)]
        tokens = [3]
        batches, vocab = [2], 1000
    elif args.quick:
        decode = [(1, 4096), (32, 4096), (64, 4096), (256, 4096), (1, 32768)]
        prefill = [(1, 0, 2048), (8, 0, 512)]
        tokens = [1, 4096]
        batches, vocab = [1, 64], VOCAB
    else:
        decode = [(b, c) for b in (1, 8, 32, 64, 128, 256) for c in (512, 4096, 32768)
                  if b * c <= 2 * 1024 * 1024]  # fmt: skip
        prefill = [(1, 0, 512), (1, 0, 4096), (8, 0, 512), (4, 3584, 512), (1, 15872, 512)]
        tokens = [1, 32, 256, 4096]
        batches, vocab = [1, 32, 256], VOCAB
    bench_decode(rep, tri, ref, device, decode, args.smoke)
    bench_prefill(rep, tri, ref, device, prefill, args.smoke)
    bench_elementwise(rep, tri, ref, device, tokens, args.smoke)
    bench_sampling(rep, tri, ref, device, batches, vocab, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
