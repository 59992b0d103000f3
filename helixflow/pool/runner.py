"""Build an ``LLMEngine`` from a model name or path: files -> torch model -> KV cache -> engine.

Device and dtype: CUDA in bf16 when a GPU is present, else CPU in fp32 (on CPUs without fast
bf16 matrix units a bf16 GEMM of 64+ rows is ~30x slower than fp32). KV cache size: an explicit
``num_blocks``, else ``kv_cache_memory`` bytes, else on CUDA 90 % of the memory free after the
weights are loaded and on CPU 1 GiB (capped at what ``max_num_seqs`` full-length sequences need).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from helixflow.errors import ConfigError
from helixflow.pool.cuda_graphs import DecodeGraphs
from helixflow.pool.llm_engine import LLMEngine
from helixflow.pool.models.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from helixflow.pool.models.llama import LlamaForCausalLM
from helixflow.pool.models.loader import LoadedModel, load_model_files

log = logging.getLogger("helixflow.pool.runner")

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model; every field has a sensible default."""

    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: CUDA if available
    dtype: str | None = None  # "float32", "bfloat16", "float16"; None: by device
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # CUDA only: replay captured decode steps (see cuda_graphs.py)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device_and_dtype(
    device: str | None, dtype: str | None, *, cuda_default: torch.dtype
) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype a model runs in; ConfigError naming the bad option.

    ``device`` None: CUDA when available, else CPU. ``dtype`` None: ``cuda_default`` on CUDA,
    fp32 on the CPU.
    """
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {name!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was asked for but no GPU is available")
    if dtype is None:
        return dev, cuda_default if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dev, DTYPES[dtype]


def build_engine(
    files: LoadedModel | str | os.PathLike[str], options: EngineOptions | None = None
) -> LLMEngine:
    """Load a chat model and wrap it in an ``LLMEngine`` ready to ``add_request``/``step``."""
    opts = options or EngineOptions()
    loaded = files if isinstance(files, LoadedModel) else load_model_files(files)
    cfg = loaded.config
    if cfg.architecture != "llama":
        raise ConfigError(f"model {loaded.source.name} is a {cfg.architecture} model, not a "
                          "chat/completions model")  # fmt: skip
    device, dtype = pick_device_and_dtype(opts.device, opts.dtype, cuda_default=torch.bfloat16)
    start = time.perf_counter()
    model = LlamaForCausalLM(cfg, dtype=dtype, device=device)
    model.load_weights(loaded.weights())
    model.eval()
    max_model_len = min(opts.max_model_len or cfg.max_position_embeddings,
                        cfg.max_position_embeddings)  # fmt: skip
    per_block = kv_cache_bytes_per_block(cfg, opts.block_size, dtype)
    if opts.num_blocks is not None:
        num_blocks = opts.num_blocks
    else:
        if opts.kv_cache_memory is not None:
            budget = opts.kv_cache_memory
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.9)
        else:
            budget = DEFAULT_CPU_KV_BYTES
        wanted = opts.max_num_seqs * -(-max_model_len // opts.block_size)
        num_blocks = min(budget // per_block, wanted)
    blocks_per_seq = -(-max_model_len // opts.block_size)
    if num_blocks < blocks_per_seq:
        raise ConfigError(
            f"kv cache: {num_blocks} blocks of {opts.block_size} tokens cannot hold one "
            f"{max_model_len}-token sequence; give more memory or a smaller max_model_len"
        )
    kv_caches = allocate_kv_cache(cfg, num_blocks, opts.block_size, dtype, device)
    eos = set(cfg.eos_token_ids)
    if loaded.tokenizer.eos_token_id is not None:
        eos.add(loaded.tokenizer.eos_token_id)
    log.info("loaded %s on %s (%s) in %.1fs; KV cache %d blocks x %d tokens (%.0f MiB)",
             loaded.source.name, device, str(dtype).removeprefix("torch."),
             time.perf_counter() - start, num_blocks, opts.block_size,
             num_blocks * per_block / 2**20)  # fmt: skip
    engine = LLMEngine(
        model, loaded.tokenizer, kv_caches, eos_token_ids=sorted(eos),
        vocab_size=cfg.vocab_size, max_model_len=max_model_len,
        max_num_seqs=opts.max_num_seqs, max_num_batched_tokens=opts.max_num_batched_tokens,
        enable_prefix_caching=opts.enable_prefix_caching,
    )  # fmt: skip
    if device.type == "cuda" and opts.cuda_graphs:
        graphs = DecodeGraphs(
            model, kv_caches, max_num_seqs=min(opts.max_num_seqs, opts.max_num_batched_tokens),
            max_blocks_per_seq=engine.builder.block_tables.shape[1], max_model_len=max_model_len,
        )  # fmt: skip
        graphs.capture()
        if graphs.enabled:
            engine.graphs = graphs
    return engine
