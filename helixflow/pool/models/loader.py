"""The one entry point for model files: `load_model_files`.

Given a model name (pulled into the cache on first use) or a path (a ``.gguf`` file, a Hugging
Face model directory, or a directory holding exactly one ``.gguf`` file), it returns a
`LoadedModel`: config, tokenizer and chat template at once, weights on demand. Everything
except the weights is read eagerly, so a bad model fails here with a `ModelLoadError`, before
the engine allocates anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from helixflow.errors import ModelLoadError
from helixflow.pool.models import gguf_loader, hf_loader
from helixflow.pool.models.config import ModelConfig
from helixflow.pool.models.hf_loader import EmbeddingSpec
from helixflow.pool.models.hub import resolve_model
from helixflow.pool.models.tokenizer import Tokenizer

__all__ = ["LoadedModel", "load_model_files"]


@dataclass(frozen=True)
class LoadedModel:
    """A model's files, read: what the engine builds and feeds a torch model from.

    ``weights()`` yields ``(name, tensor)`` pairs one at a time under Hugging Face names (GGUF:
    Llama names, fp32, q/k laid out for rotate-half RoPE; HF: the checkpoint's names and dtype);
    each call starts a fresh pass. ``weight_names`` lists them without reading any data.
    ``embedding`` is the pooling of a sentence-embedding model, else None.
    """

    config: ModelConfig
    tokenizer: Tokenizer
    source: Path
    format: Literal["gguf", "hf"]
    weight_names: tuple[str, ...]
    embedding: EmbeddingSpec | None
    _weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template, None when it ships none (ChatML is used then)."""
        return self.tokenizer.chat_template

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every ``(name, tensor)`` lazily, so only one tensor is materialized at a time."""
        return self._weights()


def _gguf_in_directory(directory: Path) -> Path | None:
    files = sorted(directory.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ModelLoadError(f"{directory} holds several GGUF files ({names}); name one of them")
    return files[0] if files else None


def _load_gguf(path: Path) -> LoadedModel:
    reader = gguf_loader.open_gguf(path)
    config = gguf_loader.gguf_config(reader, path)
    tokenizer = gguf_loader.gguf_tokenizer(reader, path)
    tokenizer.check_chat_template()
    return LoadedModel(
        config=config,
        tokenizer=tokenizer,
        source=path,
        format="gguf",
        weight_names=gguf_loader.gguf_weight_names(reader, path),
        embedding=None,
        _weights=lambda: gguf_loader.iter_gguf_weights(reader, config, path),
    )


def _load_hf(directory: Path) -> LoadedModel:
    config = hf_loader.hf_config(directory)
    tokenizer = hf_loader.hf_tokenizer(directory)
    tokenizer.check_chat_template()
    files = hf_loader.hf_weight_files(directory)
    return LoadedModel(
        config=config,
        tokenizer=tokenizer,
        source=directory,
        format="hf",
        weight_names=tuple(name for names in files.values() for name in names),
        embedding=hf_loader.hf_embedding_spec(directory),
        _weights=lambda: hf_loader.iter_hf_weights(files),
    )


def load_model_files(
    name_or_path: str | os.PathLike[str], *, pull_if_missing: bool = True
) -> LoadedModel:
    """Resolve `name_or_path` (pulling a known model on first use) and read its files.

    Raises `ModelLoadError` naming the file and the problem when anything is missing, corrupt
    or unsupported.
    """
    path = resolve_model(name_or_path, pull_if_missing=pull_if_missing)
    if path.is_file():
        return _load_gguf(path)
    if (path / "config.json").is_file():
        return _load_hf(path)
    gguf_file = _gguf_in_directory(path)
    if gguf_file is not None:
        return _load_gguf(gguf_file)
    raise ModelLoadError(f"no config.json (Hugging Face format) and no .gguf file in {path}")
