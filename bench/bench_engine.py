"""Engine benchmark: HelixFlow's ``LLMEngine`` vs Hugging Face ``generate``, and GPU decode speed.

CPU section (one run, both sides on the very same fp32 weights of SmolLM2-135M-Instruct, as read
by HelixFlow's loader; HF gets them through ``load_state_dict``, attention ``sdpa``):

- workload: 64 deterministic prompts, lengths spread evenly over 16-256 tokens in a seeded
  shuffled order. Each is the tail of a seeded chat (question/answer pairs from a fixed bank,
  rendered with the model's chat template), cut to its length and ending in the generation
  prompt. Exactly 64 output tokens each (EOS masked: HF ``min_new_tokens``, HelixFlow
  ``min_tokens``), greedy.
- helixflow: all requests added at once, ``step()`` until none is unfinished (continuous
  batching, chunked prefill, paged KV cache; prefix caching off); counted from
  ``RequestOutput.new_token_ids``.
- hf sequential: ``generate`` one prompt at a time; measured on a subset whose lengths are
  spread like the whole set (``--sequential-prompts``), tok/s extrapolated from it.
- hf batch B: left-padded batches of B in arrival order, attention mask, ``pad_token_id``.

Timing excludes model loading and includes everything per request (tokenization is done
beforehand for both). Every method gets one small warm-up on other prompts first. Reported:
output tok/s, HelixFlow / each baseline, and how many greedy outputs are token-identical.

Targets: HelixFlow >= 10x HF sequential and >= 2x the best HF padded batch.

GPU section (only with CUDA): a random-weight model of Llama-3-8B's shape in bf16 through the
same engine; decode tok/s at batch 1/8/64/256 after 128-token prompts (decode steps only), and
batch 1's time per token against the HBM roofline (weight bytes / bandwidth), with the datasheet
bandwidth and the same run's device-to-device copy bandwidth as baselines.

    python bench/bench_engine.py                       # CPU comparison (+ GPU when present)
    python bench/bench_engine.py --sequential-prompts 64 --json out.json
    python bench/bench_engine.py --smoke               # tiny plumbing check; numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from helixflow.pool.cuda_graphs import DecodeGraphs
from helixflow.pool.llm_engine import LLMEngine
from helixflow.pool.models.config import ModelConfig
from helixflow.pool.models.kv_cache import allocate_kv_cache
from helixflow.pool.models.llama import LlamaForCausalLM
from helixflow.pool.models.loader import LoadedModel, load_model_files
from helixflow.pool.models.tokenizer import Tokenizer
from helixflow.pool.runner import EngineOptions, build_engine
from helixflow.pool.sampling_params import SamplingParams

MODEL = "SmolLM2-135M-Instruct"
SEED = 0
BANK = [
    ("What is the capital of France?", "The capital of France is Paris, on the Seine."),
    ("How do plants make food?", "Plants use sunlight, water and carbon dioxide to make sugar "
     "through photosynthesis, and they release oxygen as a by-product."),
    ("Can you suggest a name for my cat?", "How about Pepper, Miso or Biscuit?"),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters "
     "more than red because its wavelength is shorter."),
    ("Give me a tip for learning Python.", "Write a small program every day, and read other "
     "people's code to pick up idioms."),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Write a haiku about rain.", "Soft rain on the roof, / the garden drinks in silence, / "
     "puddles hold the sky."),
    ("How far away is the Moon?", "On average about 384,400 kilometres from Earth."),
    ("What should I cook tonight?", "A vegetable stir-fry is quick: garlic, ginger, whatever "
     "vegetables you have, soy sauce and rice."),
    ("Explain what a CPU does.", "The CPU fetches instructions from memory, decodes them and "
     "executes them: arithmetic, comparisons and moving data."),
    ("Who wrote Pride and Prejudice?", "Jane Austen, published in 1813."),
    ("How can I sleep better?", "Keep a regular schedule, avoid screens before bed and keep "
     "your bedroom cool and dark."),
]  # fmt: skip
# Llama-3-8B's shape; the weights are random (only the speed is measured).
LLAMA3_8B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    eos_token_ids=(128001,),
)  # fmt: skip
TINY = ModelConfig(
    architecture="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=512, eos_token_ids=(0,),
)  # fmt: skip


# ---- workload ------------------------------------------------------------------------------
def build_prompts(tok: Tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` chat-prompt tails, lengths spread evenly over ``lo..hi`` in a shuffled order."""
    rng = random.Random(seed)
    lengths = [lo + round(i * (hi - lo) / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(lengths)
    prompts = []
    for length in lengths:
        messages = [{"role": "user", "content": rng.choice(BANK)[0]}]
        ids = tok.encode_chat(messages)
        while len(ids) < length:  # extend with earlier turns until long enough, then cut
            q, a = rng.choice(BANK)
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                        *messages]  # fmt: skip
            ids = tok.encode_chat(messages)
        prompts.append(ids[-length:])
    return prompts


def spread_subset(prompts: Sequence[list[int]], k: int) -> list[int]:
    """Indices of ``k`` prompts whose lengths are spread like the whole set's."""
    by_len = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return sorted(by_len[int((j + 0.5) * len(prompts) / k)] for j in range(k))


# ---- the two implementations ---------------------------------------------------------------
def hf_model(loaded: LoadedModel, transformers: Any) -> Any:
    """transformers' LlamaForCausalLM (sdpa attention) holding HelixFlow's loaded weights."""
    c = loaded.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids), pad_token_id=c.pad_token_id,
        attn_implementation="sdpa",
    )  # fmt: skip
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import (  # type: ignore[attr-defined,no-redef]
            no_init_weights,
        )
    # NOTE: no random init (seconds of CPU time). That may skip tying too, so a tied lm_head
    # is given the embedding's values explicitly and the load can be strict.
    with no_init_weights():
        model = transformers.LlamaForCausalLM(hf_config).eval()
    state = dict(loaded.weights())
    if c.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model


def hf_generate(model: Any, prompts: Sequence[list[int]], batch: int, max_tokens: int,
                pad_id: int) -> list[list[int]]:  # fmt: skip
    """Greedy ``generate`` over left-padded batches of ``batch`` prompts (1: unpadded)."""
    outs: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=pad_id)  # fmt: skip
            outs += [row[width:].tolist() for row in out]
    return outs


def helixflow_generate(engine: LLMEngine, prompts: Sequence[list[int]], max_tokens: int,
                       tag: str) -> list[list[int]]:  # fmt: skip
    """All prompts in flight at once; ``step()`` until done; the greedy tokens of each."""
    # NOTE: min_tokens masks EOS below max_tokens, the same rule as HF's min_new_tokens.
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens)
    got: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, greedy)
        got[f"{tag}-{i}"] = []
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    return [got[f"{tag}-{i}"] for i in range(len(prompts))]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def agreement(ours: Sequence[list[int]], theirs: Sequence[list[int]]) -> tuple[int, float]:
    """(token-identical outputs, mean length of the common prefix)."""
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    prefixes = [common_prefix(a, b) for a, b in zip(ours, theirs, strict=True)]
    return same, sum(prefixes) / max(len(prefixes), 1)


# ---- CPU section ---------------------------------------------------------------------------
class Table:
    """The methods' rows, printed as each finishes; HelixFlow's comes first, the ratios after."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        print("| method | prompts | output tokens | seconds | output tok/s | HelixFlow / this |")
        print("|---|---:|---:|---:|---:|---:|", flush=True)

    def run(self, method: str, fn: Any, *args: Any) -> list[list[int]]:
        start = time.perf_counter()
        outs: list[list[int]] = fn(*args)
        seconds = time.perf_counter() - start
        tokens = sum(map(len, outs))
        row = {"method": method, "prompts": len(outs), "output_tokens": tokens,
               "seconds": seconds, "tok_s": tokens / seconds}  # fmt: skip
        if self.rows:
            row["helixflow_ratio"] = self.rows[0]["tok_s"] / row["tok_s"]
        self.rows.append(row)
        ratio = f"{row['helixflow_ratio']:.2f}x" if "helixflow_ratio" in row else "-"
        print(f"| {method} | {len(outs)} | {tokens} | {seconds:.2f} | {row['tok_s']:.1f} | "
              f"{ratio} |", flush=True)  # fmt: skip
        return outs


def cpu_section(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    loaded = load_model_files(MODEL)
    cfg, n_out = loaded.config, args.max_tokens
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_ids[0]
    prompts = build_prompts(loaded.tokenizer, args.prompts, args.min_len, args.max_len, SEED)
    warm = build_prompts(loaded.tokenizer, 4, 16, 64, SEED + 1)
    seq_idx = spread_subset(prompts, min(args.sequential_prompts, len(prompts)))
    lens = [len(p) for p in prompts]
    # NOTE: prefix caching off: the prompts stand for independent requests, and a few share a
    # first block by chance; no cache hit should flatter either side.
    opts = EngineOptions(device="cpu", dtype="float32", max_model_len=args.max_len + n_out + 16,
                         enable_prefix_caching=False)  # fmt: skip
    engine = build_engine(loaded, opts)
    hf = hf_model(loaded, transformers)

    print(f"# workload: {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens (mean "
          f"{sum(lens) / len(lens):.0f}), {n_out} output tokens each (EOS masked), greedy; "
          f"{MODEL}, fp32, the same weights on both sides")  # fmt: skip
    print(f"# helixflow: LLMEngine (max_num_seqs {opts.max_num_seqs}, "
          f"{opts.max_num_batched_tokens}-token step budget, prefix caching "
          f"{'on' if opts.enable_prefix_caching else 'off'}), all requests added at once, "
          "step() until done; includes scheduling, sampling and detokenization")  # fmt: skip
    print(f"# hf sequential: transformers {transformers.__version__} LlamaForCausalLM (sdpa) "
          f"generate(), one prompt at a time, on {len(seq_idx)} of the {len(prompts)} prompts "
          f"(mean length {sum(lens[i] for i in seq_idx) / len(seq_idx):.0f}); tok/s "
          "extrapolated from them")  # fmt: skip
    print(f"# hf batch B: generate() on left-padded batches of B in arrival order (attention "
          f"mask, pad_token_id {pad_id}); B in {args.batch_sizes}")  # fmt: skip
    print("# warm-up before each method, not timed: 4 tokens on other prompts (HelixFlow 4, "
          "sequential 1, padded one full batch); times exclude model loading\n")  # fmt: skip

    table = Table()
    helixflow_generate(engine, warm, 4, "warm")
    ours = table.run("helixflow", helixflow_generate, engine, prompts, n_out, "run")
    hf_generate(hf, warm[:1], 1, 4, pad_id)
    seq_prompts = [prompts[i] for i in seq_idx]
    seq = table.run("hf sequential", hf_generate, hf, seq_prompts, 1, n_out, pad_id)
    batched: dict[int, list[list[int]]] = {}
    for b in args.batch_sizes:
        hf_generate(hf, (warm * b)[:b], b, 4, pad_id)
        batched[b] = table.run(f"hf batch {b}", hf_generate, hf, prompts, b, n_out, pad_id)

    rows = table.rows
    targets = [("HelixFlow >= 10x HF sequential", rows[1]["helixflow_ratio"], 10.0)]
    if len(rows) > 2:
        best = max(rows[2:], key=lambda r: r["tok_s"])
        targets.append((f"HelixFlow >= 2x best HF padded batch ({best['method']})",
                        best["helixflow_ratio"], 2.0))  # fmt: skip
    print("\ntargets:")
    for name, got, want in targets:
        print(f"- {name}: {got:.2f}x {'PASS' if got >= want else 'MISS'}")

    checks = [("hf sequential", [ours[i] for i in seq_idx], seq)]
    checks += [(f"hf batch {b}", ours, outs) for b, outs in batched.items()]
    print(
        "\ncorrectness: HelixFlow's greedy outputs vs HF's (padded batches may drift: padding "
        "numerics)\n| vs | token-identical | mean common prefix (tokens) |\n|---|---:|---:|"
    )
    agree = {}
    for name, a, b_outs in checks:
        same, prefix = agreement(a, b_outs)
        agree[name] = {"identical": same, "of": len(a), "mean_common_prefix": prefix}
        print(f"| {name} | {same}/{len(a)} | {prefix:.1f} of {n_out} |")
    met = [{"target": n, "ratio": g, "pass": g >= w} for n, g, w in targets]
    return {"methods": rows, "targets": met, "correctness": agree, "prompt_lens": lens,
            "sequential_prompt_indices": seq_idx}  # fmt: skip


# ---- GPU section ---------------------------------------------------------------------------
class _NoText:
    """A random model's tokens mean nothing: detokenize them to nothing."""

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return ""


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg, dtype=dtype, device=device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def decode_run(model: LlamaForCausalLM, kv: list[tuple[torch.Tensor, torch.Tensor]],
               batch: int, prompt_len: int, steps: int, max_model_len: int,
               graphs: bool = True) -> float:  # fmt: skip
    """Seconds for ``steps`` decode steps of ``batch`` sequences, every prompt prefilled."""
    cfg = model.config
    budget = max(2048, min(batch * prompt_len, 8192))
    engine = LLMEngine(model, _NoText(), kv, eos_token_ids=cfg.eos_token_ids,
                       vocab_size=cfg.vocab_size, max_model_len=max_model_len,
                       max_num_seqs=batch, max_num_batched_tokens=budget,
                       enable_prefix_caching=False)  # fmt: skip
    if graphs and kv[0][0].is_cuda:
        captured = DecodeGraphs(model, kv, max_num_seqs=batch, max_model_len=max_model_len,
                                max_blocks_per_seq=engine.builder.block_tables.shape[1],
                                sizes=[batch])  # fmt: skip
        captured.capture()
        engine.graphs = captured if captured.enabled else None
    # NOTE: ahead-of-time requests (prefilled in an earlier chunk) must not finish in the window.
    params = SamplingParams(temperature=0, max_tokens=max_model_len - prompt_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        ids = torch.randint(1, cfg.vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add_request(str(i), ids, params)
    started: set[str] = set()
    while len(started) < batch:  # prefill (and mixed steps) until every request decodes
        started.update(o.request_id for o in engine.step())
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()  # ends in a host copy of the sampled tokens: the step has run
    seconds = time.perf_counter() - start
    for i in range(batch):
        engine.abort(str(i))
    return seconds


def gpu_section(args: argparse.Namespace) -> dict[str, Any]:
    from bench_kernels import DATASHEET_GBPS, measure_copy_gbps

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        cfg, dtype, batches, prompt_len, steps = TINY, torch.float32, [1, 2], 8, 2
    else:
        cfg, dtype, batches, prompt_len, steps = LLAMA3_8B, torch.bfloat16, [1, 8, 64, 256], 128, 64
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    sheet = next((bw for frag, bw in DATASHEET_GBPS if frag in name), None)
    model = random_model(cfg, dtype, device)
    # Bytes one decode step must read at batch 1: every weight but the embedding table (one row).
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if n != "embed_tokens" or cfg.tie_word_embeddings)  # fmt: skip
    max_model_len = prompt_len + 2 * steps + 64
    blocks = max(batches) * -(-max_model_len // 16) + 16
    kv = allocate_kv_cache(cfg, blocks, 16, dtype, device)
    copy_gbps = measure_copy_gbps(device, args.smoke)
    label = "tiny random model (plumbing check; numbers mean nothing)" if args.smoke else \
        "Llama-3-8B shape, random weights"  # fmt: skip
    print(f"\n# GPU decode: {name}, {label}, {str(dtype).removeprefix('torch.')}, "
          f"{weight_bytes / 1e9:.2f} GB of weights read per step; {prompt_len}-token prompts, "
          f"{steps} timed decode steps after a warm-up run at each batch size; CUDA graphs "
          f"{'off' if args.eager or not cuda else 'on'}")  # fmt: skip
    print(f"# baseline: device-to-device copy {copy_gbps:.0f} GB/s"
          + (f" (datasheet {sheet:.0f} GB/s)" if sheet else "") + "\n")  # fmt: skip
    print("| batch | decode tok/s | ms per step |")
    print("|---:|---:|---:|")
    rows = []
    for b in batches:
        # NOTE: the warm-up passes a multiple of 16 in the sequence lengths, so every Triton
        # specialisation the timed steps need is compiled before them.
        decode_run(model, kv, b, prompt_len, min(steps, 20), max_model_len, not args.eager)
        seconds = decode_run(model, kv, b, prompt_len, steps, max_model_len, not args.eager)
        rows.append(
            {"batch": b, "tok_s": b * steps / seconds, "ms_per_step": 1e3 * seconds / steps}
        )
        print(f"| {b} | {rows[-1]['tok_s']:.1f} | {rows[-1]['ms_per_step']:.2f} |", flush=True)
    ms = rows[0]["ms_per_step"]
    bandwidths = {"copy": copy_gbps, **({"datasheet": sheet} if sheet else {})}
    roofline = {k: weight_bytes / gbps / 1e6 for k, gbps in bandwidths.items()}  # ms
    print(f"\nbatch 1: {ms:.2f} ms per token; HBM roofline (weight bytes / bandwidth):")
    for k, gbps in bandwidths.items():
        print(f"- at the {k} bandwidth, {gbps:.0f} GB/s: {roofline[k]:.2f} ms per token; batch 1 "
              f"runs at {100 * roofline[k] / ms:.0f} % of the roofline")  # fmt: skip
    return {"device": name, "weight_bytes": weight_bytes, "copy_gbps": copy_gbps,
            "datasheet_gbps": sheet, "decode": rows,
            "batch1_roofline_ms": roofline}  # fmt: skip


# ---- main ----------------------------------------------------------------------------------
def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per prompt")
    parser.add_argument(
        "--sequential-prompts",
        type=int,
        default=16,
        help="prompts HF runs one at a time (tok/s extrapolated from them)",
    )
    parser.add_argument("--batch-sizes", default="8,32", help="HF padded batch sizes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", choices=("cpu", "gpu"), help="run one section")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="GPU section: no CUDA graphs (to measure what they bring)",
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="4 prompts x 4 tokens, HF sequential 2, batch 2, tiny GPU-section "
                             "model: checks the script; its numbers mean nothing")  # fmt: skip
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    args.min_len, args.max_len = 16, 256
    if args.smoke:
        args.prompts, args.max_tokens, args.sequential_prompts = 4, 4, 2
        args.batch_sizes, args.max_len = [2], 64
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# bench_engine: {cpu_model_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
          "fp32 on the CPU")  # fmt: skip
    print(f"# command: python bench/bench_engine.py {' '.join(argv or sys.argv[1:])}".rstrip())
    report: dict[str, Any] = {"argv": argv or sys.argv[1:], "cpu": cpu_model_name(),
                              "num_cpus": os.cpu_count(), "torch": torch.__version__,
                              "torch_threads": torch.get_num_threads()}  # fmt: skip
    if args.only != "gpu":
        report["vs_transformers"] = cpu_section(args)
    if args.only != "cpu":
        if torch.cuda.is_available() or args.smoke:
            report["gpu_decode"] = gpu_section(args)
        else:
            print("\n# GPU section skipped: no CUDA GPU here")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
