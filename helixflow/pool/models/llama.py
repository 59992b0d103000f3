"""Llama-family decoder over a flat batch and a paged KV cache.

One module serves Llama 2/3 (optionally ``rope_scaling``), Mistral (``sliding_window``), SmolLM2
(tied embeddings) and Qwen2 (``attention_bias``: biases on q/k/v). The engine hands it a FLAT
batch: every scheduled token of every sequence in one ``[T]`` row, whether it belongs to a
prompt chunk or is a decode token; ``AttentionMetadata`` says which tokens belong to whom.

Each layer runs one fused q/k/v projection and one fused gate/up projection; every other op goes
through ``helixflow.kernels`` (Triton on CUDA, the torch references elsewhere). Nothing here
loops over sequences or reads a device tensor on the host, so a step never syncs on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helixflow import _native
from helixflow import kernels as K
from helixflow.pool.models.config import AttentionMetadata, ModelConfig
from helixflow.pool.models.weights import check_complete, copy_weight

__all__ = ["LlamaForCausalLM"]

# NOTE: Hugging Face checkpoints written by old transformers versions carry the rotary
# frequencies as buffers; they are derived from the config here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised, frozen parameter (``load_weights`` fills it)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


@dataclass(frozen=True)
class _Chunk:
    """One sequence's prompt chunk: its query rows, cached blocks and (if needed) its mask."""

    start: int  # first flat token row
    end: int  # one past the last
    blocks: torch.Tensor  # [nb] int64: the blocks holding keys 0 .. seq_len - 1
    seq_len: int  # keys in the cache, this chunk's included
    mask: torch.Tensor | None  # [Q, seq_len] bool; None: plain causal (the chunk is the sequence)


class CpuAttentionPlan:
    """Paged attention on the CPU: index data built once per step, shared by every layer.

    Same semantics as the kernels (``kernels/reference/attention.py``), organised for the CPU:

    - Decode rows (one query token each) go to the native ``paged_decode_attention``, which
      walks every sequence's blocks in place: no gather copy, no padding to the longest
      sequence, each key row read once for all the query heads that share it.
    - Each prompt chunk is attended on its own with torch's SDPA over its gathered blocks:
      ``is_causal`` (the flash kernel skips the masked half) when the chunk is the whole
      sequence, an explicit mask when it follows cached tokens or a sliding window applies.
      Padding chunks to a common length would cost ``chunks * longest**2`` scores instead.

    A non-fp32 cache (the native kernel reads fp32) sends decode rows down the chunk path.
    Padded token rows and sequences of length 0 get zeros.
    """

    def __init__(self, meta: AttentionMetadata, block_size: int, sliding_window: int | None):
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.num_threads = torch.get_num_threads()
        # (seq, first row, end row, seq_len) of each prompt chunk and each decode row
        self.chunks: list[tuple[int, int, int, int]] = []
        self.decode_specs: list[tuple[int, int, int, int]] = []
        for seq, (start, end, seq_len) in enumerate(
            zip(starts[:-1], starts[1:], seq_lens, strict=True)
        ):
            if end - start == 1 and seq_len > 0:
                self.decode_specs.append((seq, start, end, seq_len))
            elif end > start and seq_len > 0:  # (a padding row has length 0: zeros)
                self.chunks.append((seq, start, end, seq_len))
        decode_seqs = [spec[0] for spec in self.decode_specs]
        self.num_seqs = len(seq_lens)
        self.num_tokens = int(meta.slot_mapping.shape[0])
        self.tables = meta.block_tables
        idx = torch.tensor(decode_seqs, dtype=torch.int64)
        self.decode_rows = torch.tensor([spec[1] for spec in self.decode_specs], dtype=torch.int64)
        self.decode_all = len(decode_seqs) == self.num_seqs == self.num_tokens
        self.decode_tables = meta.block_tables.index_select(0, idx).to(torch.int32).contiguous()
        self.decode_lens = meta.seq_lens.index_select(0, idx).to(torch.int32).contiguous()
        self._chunk_cache: list[_Chunk] | None = None

    def _chunks(self, decode_too: bool) -> list[_Chunk]:
        """The chunks, built on first use (the index data is the same for every layer)."""
        if self._chunk_cache is not None:
            return self._chunk_cache
        specs = self.chunks + (self.decode_specs if decode_too else [])
        self._chunk_cache = []
        for seq, start, end, seq_len in specs:
            blocks = self.tables[seq, : -(-seq_len // self.block_size)].long()
            q_len = end - start
            mask = None
            if (q_len != seq_len and q_len > 1) or self.sliding_window is not None:
                q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
                k_pos = torch.arange(seq_len)[None, :]
                mask = k_pos <= q_pos
                if self.sliding_window is not None:
                    mask &= k_pos > q_pos - self.sliding_window
            self._chunk_cache.append(_Chunk(start, end, blocks, seq_len, mask))
        return self._chunk_cache

    def attend(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [T, H, D] (the step's queries, RoPE applied) -> attention output [T, H, D]."""
        native = key_cache.dtype == torch.float32 and q.dtype == torch.float32
        if native and self.decode_all:
            out = torch.empty_like(q)
            self._decode(q, key_cache, value_cache, scale, out)
            return out
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        if native and self.decode_rows.numel():
            dec = torch.empty((self.decode_rows.numel(), *q.shape[1:]), dtype=q.dtype)
            self._decode(q.index_select(0, self.decode_rows), key_cache, value_cache, scale, dec)
            out.index_copy_(0, self.decode_rows, dec)
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        for c in self._chunks(decode_too=not native):
            k = key_cache.index_select(0, c.blocks).view(-1, num_kv_heads, head_dim)[: c.seq_len]
            v = value_cache.index_select(0, c.blocks).view(-1, num_kv_heads, head_dim)[: c.seq_len]
            # NOTE: 4-d inputs: SDPA takes its fused CPU kernel for them (3-d: ~3x slower).
            att = F.scaled_dot_product_attention(
                q[c.start : c.end].transpose(0, 1).float()[None],
                k.transpose(0, 1).float()[None],
                v.transpose(0, 1).float()[None],
                attn_mask=c.mask,
                is_causal=c.mask is None and c.end - c.start > 1,
                scale=scale,
                enable_gqa=True,
            )  # [1, H, Q, D]
            out[c.start : c.end] = att[0].transpose(0, 1).to(q.dtype)
        return out

    def _decode(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float,
        out: torch.Tensor,
    ) -> None:  # fmt: skip
        _native.paged_decode_attention(
            q.numpy(), key_cache.numpy(), value_cache.numpy(), self.decode_tables.numpy(),
            self.decode_lens.numpy(), scale, self.sliding_window or 0, out.numpy(),
            self.num_threads,
        )  # fmt: skip


class LlamaAttention(nn.Module):
    """Fused qkv projection -> RoPE -> KV-cache write -> paged attention -> output projection."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        qkv_rows = self.q_size + 2 * self.kv_size
        self.qkv_proj = _weight(qkv_rows, config.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = (
            _weight(qkv_rows, dtype=dtype, device=device) if config.attention_bias else None
        )
        self.o_proj = _weight(config.hidden_size, self.q_size, dtype=dtype, device=device)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
        cpu_plan: CpuAttentionPlan | None,
    ) -> torch.Tensor:
        """x: [T, hidden] (normed) -> [T, hidden]; writes this step's keys/values to the cache.

        With a ``cpu_plan`` attention runs through it instead of the kernels."""
        num_tokens = x.shape[0]
        qkv = F.linear(x, self.qkv_proj, self.qkv_bias)  # [T, (H + 2 * Hkv) * D]
        # NOTE: strided views into qkv, no copies: RoPE rotates q and k in place, the cache
        # write and the attention kernels take row strides.
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k_end = self.q_size + self.kv_size
        k = qkv[:, self.q_size : k_end].view(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, k_end:].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        K.rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True)
        key_cache, value_cache = kv_cache
        K.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        if cpu_plan is not None:
            out = cpu_plan.attend(q, key_cache, value_cache, self.scale)
        elif meta.decode_only:
            # NOTE: one query row per sequence; padded token rows past the sequences (a batch
            # padded to a fixed size) get zeros. Both counts are host-side shapes: no sync.
            num_seqs = meta.seq_lens.shape[0]
            out = torch.zeros_like(q) if num_seqs < num_tokens else torch.empty_like(q)
            K.paged_decode_attention(
                q[:num_seqs], key_cache, value_cache, meta.block_tables, meta.seq_lens,
                scale=self.scale, sliding_window=self.sliding_window,
                max_seq_len=meta.max_seq_len, out=out[:num_seqs],
            )  # fmt: skip
        else:
            out = K.paged_prefill_attention(
                q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                meta.query_start_loc, scale=self.scale, sliding_window=self.sliding_window,
                max_query_len=meta.max_query_len,
            )  # fmt: skip
        return F.linear(out.view(num_tokens, self.q_size), self.o_proj)  # [T, hidden]


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = _weight(2 * inter, hidden, dtype=dtype, device=device)
        self.down_proj = _weight(hidden, inter, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        gate_up = F.linear(x, self.gate_up_proj)  # [T, 2 * I]
        return F.linear(K.silu_and_mul(gate_up), self.down_proj)  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.input_layernorm = _weight(config.hidden_size, dtype=dtype, device=device)
        self.post_attention_layernorm = _weight(config.hidden_size, dtype=dtype, device=device)
        self.self_attn = LlamaAttention(config, dtype=dtype, device=device)
        self.mlp = LlamaMLP(config, dtype=dtype, device=device)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
        cpu_plan: CpuAttentionPlan | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual): the caller adds the pair in the next norm.

        ``residual`` is None for the first layer, whose input x is the embedding.
        """
        if residual is None:
            residual = x
            x = K.rms_norm(x, self.input_layernorm, self.eps)
        else:
            x = K.fused_add_rms_norm(x, residual, self.input_layernorm, self.eps)
        x = self.self_attn(positions, x, kv_cache, meta, cos_sin_cache, cpu_plan)
        x = K.fused_add_rms_norm(x, residual, self.post_attention_layernorm, self.eps)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM: ``forward`` gives hidden states, ``compute_logits`` the logits.

    Build it with the target dtype and device, then ``load_weights`` from a Hugging Face
    state dict (names as in ``model.safetensors``). Parameters are frozen (no autograd).
    ``cpu_attention`` (default on) runs attention on the CPU through :class:`CpuAttentionPlan`
    rather than the kernels' torch reference, which is written for clarity, not speed.
    """

    def __init__(
        self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str,
        cpu_attention: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        if config.architecture != "llama":
            raise ValueError(
                f"LlamaForCausalLM needs architecture 'llama', got {config.architecture!r}"
            )
        device = torch.device(device)
        self.config = config
        self.cpu_attention = cpu_attention
        self.eps = config.rms_norm_eps
        vocab, hidden = config.vocab_size, config.hidden_size
        self.embed_tokens = _weight(vocab, hidden, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, dtype=dtype, device=device)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = _weight(config.hidden_size, dtype=dtype, device=device)
        self.lm_head = (
            self.embed_tokens
            if config.tie_word_embeddings
            else _weight(vocab, hidden, dtype=dtype, device=device)
        )
        # cos_sin_cache: [max_position_embeddings, D] fp32, not a checkpoint weight
        self.register_buffer(
            "cos_sin_cache",
            K.rope_cos_sin_cache(
                config.head_dim, config.max_position_embeddings, config.rope_theta,
                config.rope_scaling, device=device,
            ),
            persistent=False,
        )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids [T] int32/int64, positions [T] int64 -> final-normed hidden [T, hidden].

        ``kv_caches`` holds one ``(key_cache, value_cache)`` per layer (see ``kv_cache.py``);
        this step's keys and values are written at ``meta.slot_mapping`` before attention.
        With ``meta.decode_only`` the batch must have exactly one row per sequence of ``meta``.
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV caches, got {len(kv_caches)}")
        x = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        plan = None
        if self.cpu_attention and x.device.type == "cpu" and K.backend_for(x) == "torch":
            block_size = kv_caches[0][0].shape[1]
            plan = CpuAttentionPlan(meta, block_size, self.config.sliding_window)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv_cache, meta, self.cos_sin_cache, plan)
        assert residual is not None  # num_hidden_layers >= 1
        hidden: torch.Tensor = K.fused_add_rms_norm(x, residual, self.norm, self.eps)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (the rows to sample from) -> fp32 logits [N, vocab]."""
        return F.linear(hidden, self.lm_head).float()

    def _weight_slots(self) -> dict[str, torch.Tensor]:
        """Hugging Face weight name -> the tensor (or row slice of a fused one) it fills."""
        slots: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": self.embed_tokens.data,
            "model.norm.weight": self.norm.data,
        }
        if not self.config.tie_word_embeddings:
            slots["lm_head.weight"] = self.lm_head.data
        inter = self.config.intermediate_size
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
            q, kv = attn.q_size, attn.kv_size
            fused = [("weight", attn.qkv_proj.data)]
            if attn.qkv_bias is not None:
                fused.append(("bias", attn.qkv_bias.data))
            for kind, t in fused:
                slots[f"{p}self_attn.q_proj.{kind}"] = t[:q]
                slots[f"{p}self_attn.k_proj.{kind}"] = t[q : q + kv]
                slots[f"{p}self_attn.v_proj.{kind}"] = t[q + kv :]
            slots[f"{p}self_attn.o_proj.weight"] = attn.o_proj.data
            slots[f"{p}mlp.gate_proj.weight"] = mlp.gate_up_proj.data[:inter]
            slots[f"{p}mlp.up_proj.weight"] = mlp.gate_up_proj.data[inter:]
            slots[f"{p}mlp.down_proj.weight"] = mlp.down_proj.data
            slots[f"{p}input_layernorm.weight"] = layer.input_layernorm.data
            slots[f"{p}post_attention_layernorm.weight"] = layer.post_attention_layernorm.data
        return slots

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named weights in, converting dtype and device.

        Separate q/k/v and gate/up projections land in their rows of the fused ones. Raises a
        ValueError naming every missing and unexpected weight (after copying the known ones),
        or at once for a weight of the wrong shape.

        NOTE: with tied embeddings ``lm_head.weight`` is accepted as another name of the
        embedding (``state_dict()`` of a tied Hugging Face model lists both).
        """
        slots = self._weight_slots()
        tied = self.config.tie_word_embeddings
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if tied and name == "lm_head.weight":
                name = "model.embed_tokens.weight"
            dest = slots.get(name)
            if dest is None:
                if not name.endswith(_IGNORED_SUFFIXES):
                    unexpected.append(name)
                continue
            copy_weight(dest, tensor, name)
            loaded.add(name)
        check_complete("Llama", slots.keys(), loaded, unexpected)
