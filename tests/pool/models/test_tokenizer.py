"""The `Tokenizer` wrapper: special tokens, BOS handling and Hugging Face-style chat templates."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tokenizers import AddedToken, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from helixflow.errors import InvalidRequestError, ModelLoadError
from helixflow.pool.models.tokenizer import CHATML_TEMPLATE, Tokenizer

VOCAB = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "there"]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def make_backend(*, bos_post_processor: bool = False) -> BackendTokenizer:
    backend = BackendTokenizer(
        models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VOCAB[:5]])
    if bos_post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return backend


def make_tokenizer(template: str | None = None, **kwargs: Any) -> Tokenizer:
    bos = kwargs.pop("bos_post_processor", False)
    return Tokenizer(
        make_backend(bos_post_processor=bos),
        special_tokens=SPECIAL,
        chat_template=template,
        **kwargs,
    )


def test_ids_and_special_tokens() -> None:
    tokenizer = make_tokenizer()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, None)
    assert tokenizer.vocab_size == len(VOCAB)
    assert tokenizer.encode("hi there") == [7, 8]
    assert tokenizer.encode("hi</s>") == [7, 2]  # special tokens match whole
    assert tokenizer.decode([7, 2, 8]) == "hi there"
    assert tokenizer.decode([7, 2], skip_special_tokens=False) == "hi </s>"
    assert tokenizer.token_to_id("there") == 8 and tokenizer.id_to_token(8) == "there"
    assert tokenizer.token_to_id("nope") is None


def test_bos_from_post_processor_or_config() -> None:
    assert make_tokenizer(bos_post_processor=True).encode("hi") == [1, 7]
    assert make_tokenizer(bos_post_processor=True).add_bos
    # add_bos_token from tokenizer_config.json when tokenizer.json does not add it ...
    forced = make_tokenizer(add_bos_token=True)
    assert forced.add_bos and forced.encode("hi") == [1, 7]
    assert forced.encode("hi", add_special_tokens=False) == [7]
    # ... and never twice
    both = make_tokenizer(bos_post_processor=True, add_bos_token=True)
    assert both.encode("hi") == [1, 7]
    assert not make_tokenizer().add_bos


def test_special_token_missing_from_vocab() -> None:
    with pytest.raises(ModelLoadError, match="eos_token '<eot>' is not in the vocabulary"):
        Tokenizer(make_backend(), special_tokens={"eos_token": "<eot>"})


def test_default_template_is_chatml() -> None:
    tokenizer = make_tokenizer()
    assert not tokenizer.has_chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "<|im_end|>\n"
    )
    assert "<|im_start|>" in CHATML_TEMPLATE


def test_template_environment_matches_transformers() -> None:
    template = (
        "{{ bos_token }}"
        "{% for m in messages %}\n"
        "    {% if m.role == 'tool' %}{% continue %}{% endif %}\n"
        "[{{ m.role }}] {{ m.content }}{{ eos_token }}"
        "{% endfor %}\n"
        "{% if tools %}{{ tools | tojson }}{% endif %}\n"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tokenizer = make_tokenizer(template)
    messages = [
        {"role": "user", "content": "a < b & c"},
        {"role": "tool", "content": "skipped"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "<é>"}}]
    text = tokenizer.apply_chat_template(messages, tools=tools)
    # trim_blocks + lstrip_blocks: block tags leave no whitespace; loop controls work
    assert text == (
        "<s>[user] a < b & c</s>"
        + json.dumps(tools, ensure_ascii=False)  # tojson does not HTML-escape
        + "[assistant]"
    )
    assert '"<é>"' in text


def test_template_extras_and_strftime() -> None:
    tokenizer = make_tokenizer(
        "{% if enable_thinking %}think{% endif %}|{{ strftime_now('%Y') | length }}"
    )
    assert tokenizer.apply_chat_template([], enable_thinking=True) == "think|4"


def test_raise_exception_is_a_client_error() -> None:
    tokenizer = make_tokenizer(
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversation must start with a user message') }}"
        "{% endif %}ok"
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="must start with a user message") as info:
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert info.value.status == 400 and info.value.param == "messages"


def test_template_is_sandboxed() -> None:
    tokenizer = make_tokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        tokenizer.apply_chat_template([])
    tokenizer = make_tokenizer("{% set x = messages.append(1) %}")
    with pytest.raises(InvalidRequestError):
        tokenizer.apply_chat_template([])


def test_invalid_template_is_a_load_error() -> None:
    tokenizer = make_tokenizer("{% if %}")
    with pytest.raises(ModelLoadError, match="chat template is invalid"):
        tokenizer.check_chat_template()


@pytest.mark.parametrize(
    ("template", "bos_post_processor", "expected"),
    [
        # the template writes BOS and the model adds one: exactly one
        ("{{ bos_token }}hi", True, [1, 7]),
        # the template does not write it: prepended
        ("hi", True, [1, 7]),
        # a model without automatic BOS gets none
        ("hi", False, [7]),
        ("{{ bos_token }}hi", False, [1, 7]),
    ],
)
def test_encode_chat_has_one_bos(
    template: str, bos_post_processor: bool, expected: list[int]
) -> None:
    tokenizer = make_tokenizer(template, bos_post_processor=bos_post_processor)
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == expected
