"""Reading a Hugging Face model directory: config, safetensors weights, tokenizer, pooling.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (all the
``"llama"`` architecture here; Qwen2 has q/k/v biases) and ``BertModel`` (``"bert"``, for
embeddings, with sentence-transformers pooling files when present). Weights are read lazily from
``model.safetensors`` or the shards named by ``model.safetensors.index.json``, under the names
the checkpoint uses and in its stored dtype.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as BackendTokenizer

from helixflow.errors import ModelLoadError
from helixflow.pool.models.config import ModelConfig
from helixflow.pool.models.tokenizer import Tokenizer

__all__ = [
    "EmbeddingSpec",
    "hf_config",
    "hf_embedding_spec",
    "hf_tokenizer",
    "hf_weight_files",
    "iter_hf_weights",
]

# config.json "architectures" entry -> (ModelConfig.architecture, attention_bias default)
_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("llama", False),
    "Qwen2ForCausalLM": ("llama", True),
    "BertModel": ("bert", False),
    "BertForMaskedLM": ("bert", False),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "bert": "BertModel"}  # fmt: skip


# sentence-transformers 1_Pooling/config.json flag -> EmbeddingSpec.pooling
_POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",  # unsupported: rejected below
    "pooling_mode_lasttoken": "lasttoken",  # unsupported: rejected below
}
_SUPPORTED_POOLING = ("cls", "mean", "max", "mean_sqrt_len")


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a sentence-embedding model turns token states into one vector.

    From sentence-transformers' ``modules.json``, ``1_Pooling/config.json`` and
    ``sentence_bert_config.json``: `pooling` is ``"mean"``, ``"cls"``, ``"max"`` or
    ``"mean_sqrt_len"``; `normalize` is whether a Normalize (L2) module follows;
    `max_seq_length` is the length the model was trained for (None when unstated).
    """

    pooling: str
    normalize: bool
    max_seq_length: int | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path.name} is missing from the model directory {path.parent}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc


def _read_json_object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def hf_config(directory: Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face model directory (config.json, generation_config.json)."""
    path = directory / "config.json"
    raw = _read_json_object(path)
    names = raw.get("architectures") or [_MODEL_TYPES.get(str(raw.get("model_type")), "")]
    known = [name for name in names if name in _ARCHITECTURES]
    if not known:
        supported = ", ".join(_ARCHITECTURES)
        raise ModelLoadError(
            f"{path}: architecture {names} is not supported (supported: {supported})"
        )
    architecture, bias_default = _ARCHITECTURES[known[0]]

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise ModelLoadError(f"{path}: required key {key!r} is missing")
        return raw[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    # NOTE: transformers 5 writes rope settings as rope_parameters; older configs as
    # rope_theta + rope_scaling.
    rope = raw.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    eos = _ids(raw.get("eos_token_id"))
    generation = directory / "generation_config.json"
    if generation.is_file():
        eos += _ids(_read_json_object(generation).get("eos_token_id"))
    sliding = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
    try:
        return ModelConfig(
            architecture=architecture,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position_embeddings=int(need("max_position_embeddings")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", bias_default)),
            sliding_window=None if sliding is None else int(sliding),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            bos_token_id=next(iter(_ids(raw.get("bos_token_id"))), None),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            pad_token_id=next(iter(_ids(raw.get("pad_token_id"))), None),
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def hf_weight_files(directory: Path) -> dict[Path, tuple[str, ...]]:
    """Each safetensors file of the model and the tensor names it holds (headers only)."""
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_path.is_file():
        weight_map = _read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path} has no weight_map")
        shards = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif single.is_file():
        weight_map, shards = None, [single]
    else:
        raise ModelLoadError(
            f"no model.safetensors or model.safetensors.index.json in {directory} "
            "(only safetensors weights are supported)"
        )
    files = {shard: _safetensors_names(shard) for shard in shards}
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in files[directory / shard_name]:
                raise ModelLoadError(f"{index_path}: tensor {name} is not in {shard_name}")
    return files


def _safetensors_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return tuple(f.keys())
    # NOTE: safetensors raises its own SafetensorError (and OSError) for a corrupt header.
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid safetensors file: {exc}") from exc


def iter_hf_weights(files: dict[Path, tuple[str, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time, shard by shard, in the stored dtype."""
    for path, names in files.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except Exception as exc:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"reading weights from {path} failed: {exc}") from exc


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja_file} is not readable: {exc}") from exc
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json_object(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def hf_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (tokenizer.json is required)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(
            f"tokenizer.json is missing from {directory} (slow tokenizers are not supported)"
        )
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid tokenizer: {exc}") from exc
    config_path = directory / "tokenizer_config.json"
    config = _read_json_object(config_path) if config_path.is_file() else {}
    special_map_path = directory / "special_tokens_map.json"
    special_map = _read_json_object(special_map_path) if special_map_path.is_file() else {}
    special = {
        key: _token_text(config.get(key)) or _token_text(special_map.get(key))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token",
                    "sep_token", "mask_token")
    }  # fmt: skip
    add_bos = config.get("add_bos_token")
    return Tokenizer(
        backend,
        special_tokens=special,
        chat_template=_chat_template(directory, config),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
    )


def hf_embedding_spec(directory: Path) -> EmbeddingSpec | None:
    """The sentence-transformers pooling of the model, or None when it has no pooling files."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ModelLoadError(f"{modules_path} must hold a JSON list")
    types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    if "Pooling" not in types:
        return None
    pooling_config = _read_json_object(
        directory / str(types["Pooling"].get("path")) / "config.json"
    )
    modes = [mode for key, mode in _POOLING_MODES.items() if pooling_config.get(key)]
    if len(modes) != 1 or modes[0] not in _SUPPORTED_POOLING:
        raise ModelLoadError(f"{directory}: pooling {modes or 'none'} is not supported")
    st_config_path = directory / "sentence_bert_config.json"
    st_config = _read_json_object(st_config_path) if st_config_path.is_file() else {}
    max_len = st_config.get("max_seq_length")
    return EmbeddingSpec(
        pooling=modes[0],
        normalize="Normalize" in types,
        max_seq_length=int(max_len) if max_len is not None else None,
    )
