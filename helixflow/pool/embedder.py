"""The embeddings engine: texts or token ids -> one unit vector each, from a BERT-style encoder.

``build_embedder`` loads a sentence-embedding model (all-MiniLM-L6-v2 and kin) and returns an
`Embedder`; ``Embedder.embed`` tokenizes the inputs the way sentence-transformers does ([CLS]
text [SEP], at most the model's ``max_seq_length`` tokens), packs them into padded batches under
a token budget (sorted by length, so little padding is computed), runs the encoder and pools
with the model's own pooling mode. Synchronous by design: the server calls it from a thread,
and several threads may call one `Embedder` at once (it holds no per-call state).

Device and dtype: CUDA when a GPU is present, else CPU; fp32 on both unless asked otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from helixflow.errors import ConfigError, InvalidRequestError
from helixflow.pool.models.bert import POOLING_MODES, BertModel
from helixflow.pool.models.loader import LoadedModel, load_model_files
from helixflow.pool.models.tokenizer import Tokenizer
from helixflow.pool.runner import pick_device_and_dtype

__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "Embedder",
    "EmbeddingResult",
    "build_embedder",
    "plan_batches",
]

log = logging.getLogger("helixflow.pool.embedder")

# NOTE: padded tokens per forward pass. Attention scores then take at most
# budget x heads x max_len fp32 values (16384 x 12 x 256 x 4 B = 192 MiB for MiniLM).
DEFAULT_MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class EmbeddingResult:
    """The vectors of one ``embed`` call, in input order, and what they cost.

    `embeddings` is a float32 CPU tensor [N, dim]; `num_tokens` the tokens each input ran as
    (special tokens included, after truncation), which OpenAI reports as ``usage``.
    """

    embeddings: torch.Tensor
    num_tokens: tuple[int, ...]

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens over all inputs: ``usage.prompt_tokens`` (and ``total_tokens``)."""
        return sum(self.num_tokens)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group input indices into batches of at most `max_batch_tokens` padded tokens.

    Longest first, so each batch pads to its first (longest) member and neighbours are of
    similar length; an input longer than the budget runs alone. Every index appears once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # a batch pads to its first member, the longest: (size + 1) rows of that length
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class Embedder:
    """A loaded encoder that turns inputs into sentence embeddings; see ``embed``.

    Inputs are strings, tokenized here, or token-id lists, which run exactly as given (a
    client that tokenizes supplies the special tokens too, as ``tokenizer(text)`` does).
    """

    def __init__(
        self,
        model: BertModel,
        tokenizer: Tokenizer,
        *,
        pooling: str,
        max_model_len: int,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        if pooling not in POOLING_MODES:
            modes = ", ".join(POOLING_MODES)
            raise ConfigError(f"pooling: must be one of {modes}, got {pooling!r}")
        if not 1 <= max_model_len <= model.config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len: must be in 1..{model.config.max_position_embeddings} "
                f"(the model's max_position_embeddings), got {max_model_len}"
            )
        if max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens: must be >= 1, got {max_batch_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_model_len = max_model_len
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = model.config.vocab_size
        self.embedding_dim = model.config.hidden_size
        self.pad_token_id = tokenizer.pad_token_id or 0
        # NOTE: special tokens around one text ([CLS] ... [SEP]: 2); truncation keeps room.
        self._num_special: int = tokenizer.backend.num_special_tokens_to_add(False)

    @property
    def device(self) -> torch.device:
        """Where the encoder runs."""
        return self.model.word_embeddings.device

    def tokenize(
        self, inputs: Sequence[str | Sequence[int]], *, truncate: bool = False
    ) -> list[list[int]]:
        """The token ids each input runs as, checked against the model's limits.

        Raises `InvalidRequestError` (``param="input"``) for an empty list, an empty input, an
        input that is neither a string nor a list of in-vocabulary token ids, or one longer
        than ``max_model_len`` unless `truncate`: then a text keeps its first tokens and its
        special tokens (as sentence-transformers truncates), a token-id list its first ids.
        """
        if isinstance(inputs, str):
            raise TypeError("inputs must be a sequence of strings or token-id lists, not a str")
        if len(inputs) == 0:
            raise InvalidRequestError("input must not be empty", param="input")
        return [self._tokenize_one(i, item, truncate) for i, item in enumerate(inputs)]

    def _tokenize_one(self, index: int, item: object, truncate: bool) -> list[int]:
        ids: list[int]
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(f"input[{index}] is an empty string", param="input")
            ids = self.tokenizer.encode(item)
            if len(ids) > self.max_model_len and truncate:
                ids = self._truncated_text(item)
        elif (
            isinstance(item, Sequence)
            and not isinstance(item, bytes | bytearray)
            and all(type(t) is int for t in item)
        ):
            ids = list(item)
            if not ids:
                raise InvalidRequestError(f"input[{index}] is an empty token list", param="input")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input[{index}] holds token id {bad}, outside this model's vocabulary "
                    f"(0..{self.vocab_size - 1})",
                    param="input",
                )
            if truncate:
                ids = ids[: self.max_model_len]
        else:
            raise InvalidRequestError(
                f"input[{index}] must be a string or a list of integer token ids", param="input"
            )
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(
                f"input[{index}] is {len(ids)} tokens long, but this model's maximum is "
                f"{self.max_model_len} tokens; shorten the input",
                param="input",
                code="context_length_exceeded",
            )
        return ids

    def _truncated_text(self, text: str) -> list[int]:
        """Ids of `text` cut to ``max_model_len`` with its special tokens kept, as the
        ``tokenizers`` truncation (which sentence-transformers uses) cuts it."""
        backend = self.tokenizer.backend
        encoding = backend.encode(text, add_special_tokens=False)
        encoding.truncate(self.max_model_len - self._num_special)
        ids: list[int] = backend.post_process(encoding).ids
        return ids

    def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        *,
        normalize: bool = True,
        truncate: bool = False,
    ) -> EmbeddingResult:
        """One embedding per input, in input order (see ``tokenize`` for inputs and errors).

        `normalize` scales each vector to unit length (OpenAI's embeddings are unit vectors).
        An input's vector does not depend on the other inputs beside it, up to fp rounding.
        """
        token_ids = self.tokenize(inputs, truncate=truncate)
        out = torch.empty(len(token_ids), self.embedding_dim, dtype=torch.float32)
        lengths = [len(ids) for ids in token_ids]
        with torch.inference_mode():
            for batch in plan_batches(lengths, self.max_batch_tokens):
                vectors = self._embed_batch([token_ids[i] for i in batch], normalize)
                out[batch] = vectors.cpu()
        return EmbeddingResult(embeddings=out, num_tokens=tuple(lengths))

    def _embed_batch(self, rows: list[list[int]], normalize: bool) -> torch.Tensor:
        """Right-padded forward pass over `rows` -> fp32 [len(rows), dim] on the device."""
        width = max(len(row) for row in rows)
        # NOTE: right padding: BERT positions count from the first column, so real tokens keep
        # their positions; padded keys are masked, padded rows pooled out.
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L]
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = 1
        device = self.device
        return self.model.embed(
            ids.to(device), mask.to(device), pooling=self.pooling, normalize=normalize
        )


def build_embedder(
    files: LoadedModel | str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> Embedder:
    """Load a BERT-architecture embedding model and wrap it in an `Embedder`.

    `device` is ``"cuda"``, ``"cuda:1"``, ``"cpu"`` (None: CUDA if available); `dtype` one of
    ``"float32"`` (the default), ``"bfloat16"``, ``"float16"``. Raises `ConfigError` for a
    model that is not an embedding model, or a bad option.
    """
    loaded = files if isinstance(files, LoadedModel) else load_model_files(files)
    cfg = loaded.config
    if cfg.architecture != "bert":
        raise ConfigError(f"model {loaded.source.name} is a {cfg.architecture} model, not an "
                          "embedding (BERT) model")  # fmt: skip
    # NOTE: fp32 on GPU too: encoders are small and cheap next to chat models, and half
    # precision moves cosine similarities by ~1e-3, which retrieval rankings can notice.
    dev, torch_dtype = pick_device_and_dtype(device, dtype, cuda_default=torch.float32)
    spec = loaded.embedding
    if spec is None:
        # NOTE: what sentence-transformers does for a plain Hugging Face BERT checkpoint.
        log.warning("%s has no sentence-transformers pooling config; using mean pooling",
                    loaded.source.name)  # fmt: skip
    pooling = spec.pooling if spec is not None else "mean"
    trained_len = spec.max_seq_length if spec is not None else None
    max_model_len = min(trained_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    start = time.perf_counter()
    model = BertModel(cfg, dtype=torch_dtype, device=dev)
    model.load_weights(loaded.weights())
    model.eval()
    log.info("loaded %s on %s (%s) in %.1fs; %s pooling, %d dims, at most %d tokens per input",
             loaded.source.name, dev, str(torch_dtype).removeprefix("torch."),
             time.perf_counter() - start, pooling, cfg.hidden_size, max_model_len)  # fmt: skip
    return Embedder(
        model, loaded.tokenizer, pooling=pooling, max_model_len=max_model_len,
        max_batch_tokens=max_batch_tokens,
    )  # fmt: skip
