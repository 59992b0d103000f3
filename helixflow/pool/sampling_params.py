"""Per-request sampling parameters, validated once when the request arrives.

Names and ranges follow the OpenAI API where it has the parameter (``temperature``, ``top_p``,
``n``, ``seed``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs`` /
``top_logprobs``, ``stop``, ``max_tokens``) and vLLM where it does not (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``). A bad value raises
:class:`~helixflow.errors.InvalidRequestError` whose ``param`` names the field.
"""

from __future__ import annotations

import math

import msgspec

from helixflow.errors import InvalidRequestError

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20
MAX_N = 16


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick each next token of one request, and when to stop.

    ``temperature == 0`` is greedy. ``seed`` makes sampling reproducible: the same seed, prompt
    and parameters give the same tokens however the request is batched. ``max_tokens=None``
    means "until the context is full".
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"'{param}' {why}", param=param)

        def number(param: str, value: float, lo: float, hi: float) -> None:
            if not (math.isfinite(value) and lo <= value <= hi):
                raise bad(param, f"must be a number in [{lo:g}, {hi:g}], got {value!r}")

        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be in [1, {MAX_N}], got {self.n}")
        number("temperature", self.temperature, 0.0, 2.0)
        number("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise bad("top_p", "must be > 0")
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        number("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise bad("seed", "must fit in a signed 64-bit integer")
        number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        number("repetition_penalty", self.repetition_penalty, 0.01, 10.0)
        for token, bias in (self.logit_bias or {}).items():
            if token < 0:
                raise bad("logit_bias", f"has a negative token id {token}")
            number("logit_bias", bias, -100.0, 100.0)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "needs 'logprobs' to be true")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise bad("stop", f"strings must have 1 to {MAX_STOP_LENGTH} characters")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative token ids")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", "must not exceed 'max_tokens'")

    @property
    def greedy(self) -> bool:
        """True when every token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        """True when the logits depend on the tokens seen so far."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
