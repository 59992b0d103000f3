"""BERT encoder for sentence embeddings (all-MiniLM-L6-v2 and kin).

Post-LayerNorm transformer with absolute position and token-type embeddings and exact (erf)
GELU, as Hugging Face's ``BertModel``. Encoders are not paged: a padded ``[B, L]`` batch runs
dense through torch's SDPA, with padding keys masked. ``embed`` pools the last hidden states
(sentence-transformers style: mean over the mask by default, then L2 normalisation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from helixflow.pool.models.config import ModelConfig
from helixflow.pool.models.weights import check_complete, copy_weight

__all__ = ["POOLING_MODES", "BertModel"]

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
# NOTE: task heads and the pooler of BertForMaskedLM / BertModel checkpoints (embeddings pool
# the token states instead), and the position-id buffer old checkpoints saved.
_IGNORED_PREFIXES = ("pooler.", "cls.")
_IGNORED_NAMES = ("embeddings.position_ids",)


def _weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised, frozen parameter (``load_weights`` fills it)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class _LayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _weight(hidden, dtype=dtype, device=device)
        self.bias = _weight(hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _weight(n_out, n_in, dtype=dtype, device=device)
        self.bias = _weight(n_out, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BertLayer(nn.Module):
    """Self-attention (fused q/k/v) and GELU MLP, each followed by add & LayerNorm."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = _Linear(hidden, 3 * hidden, dtype, device)
        self.o_proj = _Linear(hidden, hidden, dtype, device)
        self.attention_norm = _LayerNorm(hidden, eps, dtype, device)
        self.up_proj = _Linear(hidden, config.intermediate_size, dtype, device)
        self.down_proj = _Linear(config.intermediate_size, hidden, dtype, device)
        self.output_norm = _LayerNorm(hidden, eps, dtype, device)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, hidden], key_bias [B, 1, 1, L] additive -> [B, L, hidden]."""
        batch, length, hidden = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)  # [B, H, L, D]
        att = att.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attention_norm(x + self.o_proj(att))
        out: torch.Tensor = self.output_norm(x + self.down_proj(F.gelu(self.up_proj(x))))
        return out


class BertModel(nn.Module):
    """BERT encoder: ``forward`` gives the last hidden states, ``embed`` pooled sentence vectors.

    Build it with the target dtype and device, then ``load_weights`` from a Hugging Face state
    dict (``BertModel`` names, optionally prefixed ``bert.`` as in ``BertForMaskedLM``).
    """

    def __init__(
        self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        if config.architecture != "bert":
            raise ValueError(f"BertModel needs architecture 'bert', got {config.architecture!r}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
                f"({config.num_attention_heads})"
            )
        device = torch.device(device)
        self.config = config
        hidden = config.hidden_size
        self.word_embeddings = _weight(config.vocab_size, hidden, dtype=dtype, device=device)
        self.position_embeddings = _weight(
            config.max_position_embeddings, hidden, dtype=dtype, device=device
        )
        self.token_type_embeddings = _weight(
            config.type_vocab_size, hidden, dtype=dtype, device=device
        )
        self.embedding_norm = _LayerNorm(hidden, config.layer_norm_eps, dtype, device)
        self.layers = nn.ModuleList(
            BertLayer(config, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (1 = token, 0 = padding) [B, L] -> hidden [B, L, hidden].

        ``token_type_ids`` [B, L] defaults to zeros (one segment). Sequences are right-padded
        or left-padded alike: positions count from the first column, as in Hugging Face.
        """
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        x: torch.Tensor = F.embedding(input_ids, self.word_embeddings)  # [B, L, hidden]
        x = x + self.position_embeddings[:length]
        if token_type_ids is None:
            x = x + self.token_type_embeddings[0]
        else:
            x = x + F.embedding(token_type_ids, self.token_type_embeddings)
        x = self.embedding_norm(x)  # [B, L, hidden]
        # NOTE: an additive mask with the dtype's minimum, as Hugging Face uses: a fully padded
        # row then attends uniformly instead of turning into NaN.
        key_bias = torch.zeros(batch, 1, 1, length, dtype=x.dtype, device=x.device)
        key_bias.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, key_bias)
        return x

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        pooling: str = "mean",
        normalize: bool = True,
    ) -> torch.Tensor:
        """input_ids, attention_mask [B, L] -> fp32 sentence embeddings [B, hidden].

        ``pooling`` is one of ``POOLING_MODES`` (sentence-transformers' modes): the mean of the
        unmasked token states, the first token's state, their element-wise max, or their sum
        over ``sqrt(count)``; ``normalize`` scales each vector to unit L2 norm.
        """
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        hidden = self.forward(input_ids, attention_mask).float()  # [B, L, hidden]
        mask = attention_mask[..., None].to(hidden.dtype)  # [B, L, 1]
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).amax(dim=1)
        else:
            summed = (hidden * mask).sum(dim=1)
            count = mask.sum(dim=1).clamp(min=1e-9)  # [B, 1]
            pooled = summed / (count.sqrt() if pooling == "mean_sqrt_len" else count)
        return F.normalize(pooled, p=2, dim=-1) if normalize else pooled

    def _weight_slots(self) -> dict[str, torch.Tensor]:
        """Hugging Face weight name -> the tensor (or row slice of a fused one) it fills."""
        slots: dict[str, torch.Tensor] = {
            "embeddings.word_embeddings.weight": self.word_embeddings.data,
            "embeddings.position_embeddings.weight": self.position_embeddings.data,
            "embeddings.token_type_embeddings.weight": self.token_type_embeddings.data,
            "embeddings.LayerNorm.weight": self.embedding_norm.weight.data,
            "embeddings.LayerNorm.bias": self.embedding_norm.bias.data,
        }
        hidden = self.config.hidden_size
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, BertLayer)
            p = f"encoder.layer.{i}."
            for kind in ("weight", "bias"):
                fused = getattr(layer.qkv_proj, kind).data
                for j, name in enumerate(("query", "key", "value")):
                    slots[f"{p}attention.self.{name}.{kind}"] = fused[j * hidden : (j + 1) * hidden]
                for hf_name, module in (
                    ("attention.output.dense", layer.o_proj),
                    ("attention.output.LayerNorm", layer.attention_norm),
                    ("intermediate.dense", layer.up_proj),
                    ("output.dense", layer.down_proj),
                    ("output.LayerNorm", layer.output_norm),
                ):
                    slots[f"{p}{hf_name}.{kind}"] = getattr(module, kind).data
        return slots

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named weights in, converting dtype and device.

        A ``bert.`` prefix is dropped and LayerNorm ``gamma``/``beta`` (old TF conversions)
        read as ``weight``/``bias``; the pooler and task heads are skipped. Raises a ValueError
        naming every missing and unexpected weight, or at once for a weight of the wrong shape.
        """
        slots = self._weight_slots()
        loaded: set[str] = set()
        unexpected: list[str] = []
        for raw_name, tensor in weights:
            name = _canonical(raw_name)
            dest = slots.get(name)
            if dest is None:
                if not (name.startswith(_IGNORED_PREFIXES) or name in _IGNORED_NAMES):
                    unexpected.append(raw_name)
                continue
            copy_weight(dest, tensor, raw_name)
            loaded.add(name)
        check_complete("BERT", slots.keys(), loaded, unexpected)


def _canonical(name: str) -> str:
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name
