"""`Tokenizer`: a Hugging Face ``tokenizers.Tokenizer`` plus special tokens and a chat template.

Loaders build the backend (from ``tokenizer.json`` or a GGUF file's metadata); this wrapper adds
what serving needs on top: the BOS/EOS ids, and chat templates rendered the way Hugging Face
``transformers`` renders them (a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, a non-escaping ``tojson``, ``strftime_now``, and the
special tokens as variables), so a template written for the Hub behaves the same here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from helixflow.errors import InvalidRequestError, ModelLoadError

__all__ = ["CHATML_TEMPLATE", "Tokenizer"]

# NOTE: used when a model ships no chat template. ChatML is what most small open chat models
# (SmolLM2, Qwen2) are trained on; `Tokenizer.has_chat_template` tells the caller it is a guess.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # NOTE: Jinja's own tojson HTML-escapes '<', '>' and '&', which would corrupt tool schemas.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one model, and its chat template.

    `special_tokens` maps template variable names (``bos_token``, ``eos_token``, ``pad_token``,
    ...) to token strings. `add_bos_token` forces a BOS in front of ``encode(...,
    add_special_tokens=True)`` when the backend's post-processor does not add one.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
    ) -> None:
        # NOTE: tokenizer.json may switch on fixed padding and truncation (sentence-transformers
        # ships Fixed(128) for all-MiniLM-L6-v2); lengths are the engine's policy, not silent.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.bos_token_id = self._lookup("bos_token")
        self.eos_token_id = self._lookup("eos_token")
        self.pad_token_id = self._lookup("pad_token")
        probe = backend.encode("a", add_special_tokens=True).ids
        backend_adds_bos = bool(probe) and probe[0] == self.bos_token_id
        # NOTE: tokenizer.json's post-processor decides, unless the config asks for a BOS
        # that the post-processor does not add (transformers honours add_bos_token too).
        self._prepend_bos = bool(add_bos_token) and not backend_adds_bos
        self.add_bos = self.bos_token_id is not None and (backend_adds_bos or self._prepend_bos)

    def _lookup(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        if token is None:
            return None
        token_id: int | None = self.backend.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(f"tokenizer: {key} {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        size: int = self.backend.get_vocab_size(with_added_tokens=True)
        return size

    @property
    def bos_token(self) -> str | None:
        """The BOS token string, if the model has one."""
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The EOS token string, if the model has one."""
        return self.special_tokens.get("eos_token")

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template (otherwise ChatML is used)."""
        return self.chat_template is not None

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        token_id: int | None = self.backend.token_to_id(token)
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (byte-level spelling for BPE models)."""
        token: str | None = self.backend.id_to_token(token_id)
        return token

    def token_text(self, token_id: int) -> str:
        """The text one token stands for, as OpenAI's logprobs show it (" Paris", not the
        byte-level spelling "ĠParis"); a token that is part of a multi-byte character decodes
        to U+FFFD. Cached per token."""
        cache: dict[int, str] = self.__dict__.setdefault("_token_texts", {})
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/CLS/SEP as the model expects."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens are dropped unless `skip_special_tokens` is False."""
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    @cached_property
    def _template(self) -> jinja2.Template:
        source = self.chat_template if self.chat_template is not None else CHATML_TEMPLATE
        try:
            return _compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(
                f"the model's chat template is invalid: {exc.message} (line {exc.lineno})"
            ) from exc

    def check_chat_template(self) -> None:
        """Compile the chat template now, raising `ModelLoadError` when it is invalid."""
        _ = self._template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` (and `tools`, JSON schemas) to the model's prompt text.

        `extra` reaches the template as variables (e.g. ``enable_thinking``, ``documents``).
        A template that rejects the conversation (``raise_exception``) raises
        `InvalidRequestError` with its message.
        """
        variables: dict[str, Any] = {
            **self.special_tokens,
            **extra,
            "messages": [dict(message) for message in messages],
            "tools": [dict(tool) for tool in tools] if tools is not None else None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            text: str = self._template.render(**variables)
        except jinja2.TemplateError as exc:
            # NOTE: raise_exception is how templates reject a conversation (bad role order,
            # unsupported content), which is the client's doing, hence a 400.
            raise InvalidRequestError(f"chat template: {exc.message}", param="messages") from exc
        return text

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation, with exactly one BOS when the model uses one.

        Like transformers, the rendered text is encoded without automatic special tokens (the
        template writes them); a BOS is prepended only when the model adds one to plain text
        and the template did not already emit it.
        """
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra
        )
        ids = self.encode(text, add_special_tokens=False)
        bos = self.bos_token_id
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids
