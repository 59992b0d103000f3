"""Reading a GGUF file: its `ModelConfig`, its tokenizer, and its weights under Hugging Face names.

GGUF (llama.cpp's format) keeps the config as ``<arch>.*`` metadata keys, the tokenizer as
``tokenizer.ggml.*`` arrays, and the weights as (often quantized) tensors named ``blk.N.attn_q``
and so on. This module turns all three into what a Hugging Face Llama checkpoint would give:
fp32 tensors named ``model.layers.N.self_attn.q_proj.weight``, laid out for rotate-half RoPE.

Only the ``llama`` architecture (Llama 2/3, Mistral, SmolLM2, ...) with a byte-level BPE
(``gpt2``) tokenizer is supported; anything else is a `ModelLoadError` naming what was found.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from helixflow.errors import ModelLoadError
from helixflow.pool.models.config import ModelConfig
from helixflow.pool.models.tokenizer import Tokenizer

__all__ = [
    "gguf_config",
    "gguf_tokenizer",
    "gguf_weight_names",
    "iter_gguf_weights",
    "open_gguf",
    "unpermute_rope_rows",
]

logger = logging.getLogger(__name__)

_SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face Llama name ("{i}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Pre-tokenizer split regexes by ``tokenizer.ggml.pre`` (the same ones llama.cpp uses).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral")
# StarCoder-family vocabularies split every digit off before the GPT-2 regex.
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_GPT2_PRE = ("gpt-2", "default", "gpt2", "phi-2", "jais", "olmo", "stablelm2", "poro-chat")


def open_gguf(path: Path) -> GGUFReader:
    """Parse the header of the GGUF file at `path` (tensor data stays memory-mapped)."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r})")
    try:
        return GGUFReader(path)
    # NOTE: a truncated or corrupt file fails inside gguf in many ways (ValueError, IndexError,
    # struct errors); all of them mean the same thing to the user.
    except Exception as exc:
        raise ModelLoadError(f"{path} is a corrupt or truncated GGUF file: {exc}") from exc


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"GGUF metadata {key} is unreadable: {exc}") from exc


def _required(reader: GGUFReader, key: str, path: Path) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelLoadError(f"{path}: GGUF metadata key {key} is missing")
    return value


def _architecture(reader: GGUFReader, path: Path) -> str:
    arch = _required(reader, "general.architecture", path)
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(_SUPPORTED_ARCHITECTURES)})"
        )
    return str(arch)


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {
        "rope_type": kind,
        "factor": _field(reader, f"{arch}.rope.scaling.factor"),
    }
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def gguf_config(reader: GGUFReader, path: Path) -> ModelConfig:
    """The `ModelConfig` stated by a GGUF file's metadata."""
    arch = _architecture(reader, path)

    def key(name: str) -> Any:
        return _required(reader, f"{arch}.{name}", path)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ModelLoadError(
            f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} != head_dim "
            f"{head_dim}) are not supported"
        )
    tokens = _required(reader, "tokenizer.ggml.tokens", path)
    eos_ids = [
        int(value)
        for name in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (value := _field(reader, f"tokenizer.ggml.{name}")) is not None
    ]
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    names = {tensor.name for tensor in reader.tensors}
    try:
        return ModelConfig(
            architecture="llama",
            vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(key("context_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=_rope_scaling(reader, arch),
            # NOTE: llama.cpp writes output.weight only when it differs from the embedding.
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            pad_token_id=None if pad is None else int(pad),
        )
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor, or None when it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"


def gguf_weight_names(reader: GGUFReader, path: Path) -> tuple[str, ...]:
    """The Hugging Face names of the file's tensors, in file order."""
    result = []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise ModelLoadError(f"{path}: GGUF tensor {tensor.name} is not supported")
        result.append(name)
    return tuple(result)


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q/k projection weight (or bias).

    llama.cpp's converter reorders each head's rows from Hugging Face's rotate-half RoPE layout
    (the rotated pairs are rows ``j`` and ``j + D/2``) to the interleaved layout (rows ``2j``
    and ``2j + 1``). The inverse puts row ``2j`` back at ``j`` and row ``2j + 1`` at ``j + D/2``.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    # weight: [H * D, ...] viewed as [H, D/2, 2, ...] (interleaved pairs) -> [H, 2, D/2, ...]
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape).contiguous()


def iter_gguf_weights(
    reader: GGUFReader, config: ModelConfig, path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, fp32 tensor)`` one tensor at a time, dequantized and un-permuted."""
    for tensor, name in zip(reader.tensors, gguf_weight_names(reader, path), strict=True):
        # NOTE: GGUF lists dimensions fastest-first (ne[0] = columns), the reverse of torch.
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}"
            ) from exc
        # F32 tensors come back as read-only views of the memory map: copy them.
        array = np.array(array, dtype=np.float32, copy=not array.flags.writeable)
        if array.size != int(np.prod(shape)):
            raise ModelLoadError(
                f"{path}: tensor {tensor.name} holds {array.size} values, expected shape {shape}"
            )
        weight = torch.from_numpy(array).reshape(shape)
        heads = _rope_heads(name, config)
        if heads is not None:
            if shape[0] != heads * config.head_dim:
                raise ModelLoadError(
                    f"{path}: tensor {tensor.name} has {shape[0]} rows, expected "
                    f"{heads} heads x {config.head_dim}"
                )
            weight = unpermute_rope_rows(weight, heads)
        yield name, weight


def _rope_heads(name: str, config: ModelConfig) -> int | None:
    """The head count whose rows llama.cpp permuted in tensor `name`, None when unpermuted."""
    if ".self_attn.q_proj." in name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in name:
        return config.num_key_value_heads
    return None


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for llama.cpp's ``tokenizer.ggml.pre`` and whether merges are skipped
    for whole-word vocabulary hits (Llama 3's ``ignore_merges``)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        ), False
    if pre in _LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, plain]), True
    if pre not in _GPT2_PRE:
        # NOTE: llama.cpp refuses unknown pre-tokenizers; the GPT-2 split is right for most
        # byte-level vocabularies and only changes how rare strings split.
        logger.warning("unknown GGUF pre-tokenizer %r; using the GPT-2 split", pre)
    return byte_level, False


def _merge_pair(merge: str, path: Path) -> tuple[str, str]:
    # NOTE: byte-level tokens spell a space as "Ġ", so the one raw space separates the pair.
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ModelLoadError(f"{path}: GGUF tokenizer merge {merge!r} is not a pair")
    return left, right


def gguf_tokenizer(reader: GGUFReader, path: Path) -> Tokenizer:
    """The tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""
    kind = _required(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise ModelLoadError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = _required(reader, "tokenizer.ggml.tokens", path)
    merges: list[str] = _required(reader, "tokenizer.ggml.merges", path)
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type", [])
    pre_tokenizer, ignore_merges = _pre_tokenizer(
        str(_field(reader, "tokenizer.ggml.pre", "default"))
    )
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # NOTE: a duplicated token keeps its first id
    pairs = [_merge_pair(merge, path) for merge in merges]
    try:
        backend = BackendTokenizer(
            models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: GGUF tokenizer vocabulary or merges are invalid: {exc}"
        ) from exc
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # NOTE: control tokens (<|im_start|>, ...) and user-defined ones must match whole in text,
    # not be split by BPE; added tokens whose text is already in the vocabulary keep their ids.
    typed = list(zip(tokens, token_types, strict=False))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED]
    )

    def token_of(key: str) -> str | None:
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise ModelLoadError(f"{path}: tokenizer.ggml.{key} {token_id} is out of range")
        return tokens[int(token_id)]

    special = {
        "bos_token": token_of("bos_token_id"),
        "eos_token": token_of("eos_token_id"),
        "pad_token": token_of("padding_token_id"),
        "unk_token": token_of("unknown_token_id"),
    }
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _post_processor(backend, special, add_bos=add_bos, add_eos=add_eos)
    template = _field(reader, "tokenizer.chat_template")
    return Tokenizer(backend, special_tokens=special, chat_template=template)


def _post_processor(
    backend: BackendTokenizer, special: dict[str, str | None], *, add_bos: bool, add_eos: bool
) -> processors.PostProcessor:
    bos = special["bos_token"] if add_bos else None
    eos = special["eos_token"] if add_eos else None
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False)
    head = f"{bos}:0 " if bos else ""
    tail = f" {eos}:0" if eos else ""
    used = [token for token in (bos, eos) if token]
    return processors.TemplateProcessing(
        single=f"{head}$A:0{tail}",
        pair=f"{head}$A:0{tail} {head}$B:1{tail}",
        special_tokens=[(token, backend.token_to_id(token)) for token in dict.fromkeys(used)],
    )
