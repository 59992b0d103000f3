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

from helixflow import kernels as K
from helixflow.models.config import AttentionMetadata, ModelConfig

__all__ = ["LlamaForCausalLM"]

# NOTE: Hugging Face checkpoints written by old transformers versions carry the rotary
# frequencies as buffers; they are derived from the config here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_LISTED = 20


def _weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised, frozen parameter (``load_weights`` fills it)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def _gather_kv(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Each sequence's cached rows as a strided view: cache [blocks, bs, Hkv, D], tables
    [S, nb] int64 -> fp32 [S, Hkv, nb * bs, D] (one gather copy, then a transposed view)."""
    num_seqs, num_blocks = tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    # NOTE: index_select is several times faster on the CPU than advanced indexing.
    rows = cache.index_select(0, tables.flatten())  # [S * nb, bs, Hkv, D]
    rows = rows.view(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    return rows.transpose(1, 2).float()


@dataclass(frozen=True)
class _QueryGroup:
    """Sequences whose query rows are attended together, padded to ``Q`` rows each."""

    rows: torch.Tensor  # [S', Q] int64: flat token row of each query slot (pads repeat the last)
    tables: torch.Tensor  # [S', nb] int64: live blocks; stale entries replaced by block 0
    allowed: torch.Tensor  # [S', 1, Q, L] bool: causal, within seq_len and the window
    keep: torch.Tensor  # [S', Q] bool: the real (not padded) query slots
    out_rows: torch.Tensor  # [n] int64: rows[keep]


class CpuAttentionPlan:
    """Paged attention on the CPU: index tensors built once per step, shared by every layer.

    Same semantics as the kernels (``kernels/reference/attention.py``), organised for the CPU:
    sequences with one query token form one group, those with a chunk another padded only to
    the longest chunk among them (padding a decode batch to a prompt chunk's length would cost
    ``num_seqs * chunk * context`` scores); the live blocks are gathered once per layer and
    torch's SDPA attends (its CPU flash kernel reads the strided K/V views in place and handles
    GQA without repeating K/V). Padded token rows and sequences of length 0 get zeros.

    NOTE: building the plan reads the step's small index tensors on the host, which is free on
    the CPU; the model uses it only there (on CUDA the Triton kernels run and nothing syncs).
    """

    def __init__(self, meta: AttentionMetadata, block_size: int, sliding_window: int | None):
        starts = meta.query_start_loc.long()
        query_lens = starts[1:] - starts[:-1]  # [S]
        seq_lens = meta.seq_lens.long()
        self.groups: list[_QueryGroup] = []
        for chunked in (False, True):
            picked = (query_lens > 1) if chunked else (query_lens == 1) & (seq_lens > 0)
            seqs = picked.nonzero().flatten()
            if seqs.numel():
                self.groups.append(_plan_group(meta, seqs, starts, query_lens, seq_lens,
                                               block_size, sliding_window))  # fmt: skip

    def attend(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [T, H, D] (the step's queries, RoPE applied) -> attention output [T, H, D]."""
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        for g in self.groups:
            qg = q[g.rows].float().transpose(1, 2)  # [S', H, Q, D]
            k = _gather_kv(key_cache, g.tables)  # [S', Hkv, L, D]
            v = _gather_kv(value_cache, g.tables)
            att = F.scaled_dot_product_attention(
                qg, k, v, attn_mask=g.allowed, scale=scale, enable_gqa=True
            ).transpose(1, 2)  # [S', Q, H, D]
            out[g.out_rows] = att[g.keep].to(q.dtype)
        return out


def _plan_group(
    meta: AttentionMetadata, seqs: torch.Tensor, starts: torch.Tensor, query_lens: torch.Tensor,
    seq_lens: torch.Tensor, block_size: int, sliding_window: int | None,
) -> _QueryGroup:  # fmt: skip
    lens, qlens = seq_lens[seqs], query_lens[seqs]  # [S']
    num_blocks = -(-int(lens.max()) // block_size)
    tables = meta.block_tables[seqs, :num_blocks].long()
    # NOTE: entries past a sequence's last block may be stale (the batch builder leaves them),
    # so they are pointed at block 0: the gather stays in range and their keys are masked.
    live = torch.arange(num_blocks) < (-(-lens // block_size))[:, None]
    tables = torch.where(live, tables, torch.zeros_like(tables))
    slots = torch.arange(int(qlens.max()))  # [Q]
    clamped = torch.minimum(slots[None, :], qlens[:, None] - 1)  # [S', Q]
    rows = starts[seqs][:, None] + clamped
    q_pos = ((lens - qlens)[:, None] + clamped)[..., None]  # [S', Q, 1]
    k_pos = torch.arange(num_blocks * block_size)  # [L]
    allowed = (k_pos <= q_pos) & (k_pos < lens[:, None, None])  # [S', Q, L]
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    keep = slots[None, :] < qlens[:, None]
    return _QueryGroup(rows, tables, allowed[:, None], keep, rows[keep])


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
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(name)
        missing = slots.keys() - loaded
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing {len(missing)}: {_listed(missing)}")
            if unexpected:
                problems.append(f"unexpected {len(unexpected)}: {_listed(unexpected)}")
            raise ValueError("Llama weights do not match the config: " + "; ".join(problems))
