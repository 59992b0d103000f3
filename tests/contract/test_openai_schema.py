"""Tests of the contract harness itself: realistic OpenAI payloads pass, mutated ones fail.

The payloads are hand-written in the shape OpenAI's API sends them; the gateway's own contract
tests validate HelixFlow's real responses with the same harness.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai_schema
import pytest
from jsonschema import Draft202012Validator
from openai_schema import (
    CHAT_COMPLETION,
    CHAT_COMPLETION_CHUNK,
    CHAT_COMPLETION_REQUEST,
    COMPLETION,
    COMPLETION_CHUNK,
    COMPLETION_REQUEST,
    EMBEDDING_LIST,
    EMBEDDING_LIST_BASE64,
    EMBEDDING_REQUEST,
    ERROR,
    MODEL,
    MODEL_LIST,
    request_schema_fields,
    validate,
)

Payload = dict[str, Any]

CREATED = 1741570283
USAGE: Payload = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def token_logprob(token: str, logprob: float) -> Payload:
    """A ChatCompletionTokenLogprob with two alternatives."""
    alternative = {"token": token + "!", "logprob": logprob - 1.5, "bytes": None}
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": token, "logprob": logprob, "bytes": list(token.encode())},
            alternative,
        ],
    }


CHAT: Payload = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": CREATED,
    "model": "smollm2-135m-instruct",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there", "refusal": None},
            "logprobs": {
                "content": [token_logprob("Hello", -0.31), token_logprob(" there", -1.2)],
                "refusal": None,
            },
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {
                        "id": "call_def456",
                        "type": "custom",
                        "custom": {"name": "sql", "input": "SELECT 1"},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
    ],
    "usage": USAGE,
    "service_tier": "default",
    "system_fingerprint": "fp_helixflow",
}


def chunk(choices: list[Payload], **extra: Any) -> Payload:
    """A chat.completion.chunk with the stream's shared id, created and model."""
    base = {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "smollm2-135m-instruct",
        "system_fingerprint": "fp_helixflow",
        "choices": choices,
    }
    return base | extra


CHAT_CHUNKS: list[Payload] = [
    chunk(
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        usage=None,
    ),
    chunk(
        [
            {
                "index": 0,
                "delta": {"content": "Hello"},
                "logprobs": {"content": [token_logprob("Hello", -0.31)], "refusal": None},
                "finish_reason": None,
            }
        ],
        usage=None,
    ),
    chunk(
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_abc123",
                            "type": "function",
                            "function": {"name": "f", "arguments": ""},
                        }
                    ]
                },
                "finish_reason": None,
            }
        ]
    ),
    chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], usage=None),
    # The usage-only chunk of `stream_options: {"include_usage": true}`.
    chunk([], usage=USAGE),
]

COMPLETION_RESPONSE: Payload = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": CREATED,
    "model": "smollm2-135m-instruct",
    "system_fingerprint": "fp_helixflow",
    "choices": [
        {
            "text": " there",
            "index": 0,
            "logprobs": {
                "tokens": [" there"],
                "token_logprobs": [-0.25],
                "top_logprobs": [{" there": -0.25, " world": -2.0}],
                "text_offset": [5],
            },
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}

COMPLETION_CHUNKS: list[Payload] = [
    {
        **COMPLETION_RESPONSE,
        "choices": [{"text": " there", "index": 0, "logprobs": None, "finish_reason": None}],
        "usage": None,
    },
    {
        **COMPLETION_RESPONSE,
        "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": None,
    },
    {**COMPLETION_RESPONSE, "choices": []},
]

EMBEDDINGS: Payload = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 0.015797347]},
        {"object": "embedding", "index": 1, "embedding": [-0.0028842222, 0.0, 1]},
    ],
    "model": "all-minilm-l6-v2",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

EMBEDDINGS_BASE64: Payload = {
    **EMBEDDINGS,
    # float32 little-endian [1.0, -2.0] and [0.5], as OpenAI encodes them
    "data": [
        {"object": "embedding", "index": 0, "embedding": "AACAPwAAAMA="},
        {"object": "embedding", "index": 1, "embedding": "AAAAPw=="},
    ],
}

MODEL_OBJECT: Payload = {
    "id": "smollm2-135m-instruct",
    "object": "model",
    "created": 1686935002,
    "owned_by": "helixflow",
}
MODEL_LIST_RESPONSE: Payload = {
    "object": "list",
    "data": [MODEL_OBJECT, {**MODEL_OBJECT, "id": "all-minilm-l6-v2", "shutdown_date": None}],
}

ERROR_RESPONSE: Payload = {
    "error": {
        "message": "The model `gpt-5` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
}

RESPONSE_SCHEMAS = [
    CHAT_COMPLETION,
    CHAT_COMPLETION_CHUNK,
    COMPLETION,
    COMPLETION_CHUNK,
    EMBEDDING_LIST,
    EMBEDDING_LIST_BASE64,
    MODEL_LIST,
    ERROR,
]

VALID: list[tuple[str, Payload]] = [
    (CHAT_COMPLETION, CHAT),
    *((CHAT_COMPLETION_CHUNK, payload) for payload in CHAT_CHUNKS),
    (COMPLETION, COMPLETION_RESPONSE),
    (COMPLETION_CHUNK, COMPLETION_RESPONSE),
    *((COMPLETION_CHUNK, payload) for payload in COMPLETION_CHUNKS),
    (EMBEDDING_LIST, EMBEDDINGS),
    (EMBEDDING_LIST_BASE64, EMBEDDINGS_BASE64),
    (MODEL_LIST, MODEL_LIST_RESPONSE),
    (MODEL, MODEL_OBJECT),
    (ERROR, ERROR_RESPONSE),
]


@pytest.mark.parametrize(
    ("schema_name", "payload"), VALID, ids=[f"{name}-{i}" for i, (name, _) in enumerate(VALID)]
)
def test_realistic_payloads_conform(schema_name: str, payload: Payload) -> None:
    validate(payload, schema_name)


def set_at(path: tuple[str | int, ...], value: Any) -> Callable[[Payload], None]:
    """A mutation that sets ``payload[path]`` to ``value``."""

    def mutate(payload: Payload) -> None:
        target: Any = payload
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def delete_at(path: tuple[str | int, ...]) -> Callable[[Payload], None]:
    """A mutation that deletes ``payload[path]``."""

    def mutate(payload: Payload) -> None:
        target: Any = payload
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


# (what is wrong, schema, valid payload, mutation, what the error message must say)
INVALID: list[tuple[str, str, Payload, Callable[[Payload], None], str]] = [
    ("missing id", CHAT_COMPLETION, CHAT, delete_at(("id",)), "$: 'id' is a required property"),
    ("created as string", CHAT_COMPLETION, CHAT, set_at(("created",), "1741570283"), "$.created"),
    (
        "bogus finish_reason",
        CHAT_COMPLETION,
        CHAT,
        set_at(("choices", 0, "finish_reason"), "bogus"),
        "$.choices[0].finish_reason",
    ),
    (
        "null finish_reason",
        CHAT_COMPLETION,
        CHAT,
        set_at(("choices", 0, "finish_reason"), None),
        "$.choices[0].finish_reason",
    ),
    (
        "chunk object",
        CHAT_COMPLETION,
        CHAT,
        set_at(("object",), "chat.completion.chunk"),
        "$.object",
    ),
    (
        "missing logprobs",
        CHAT_COMPLETION,
        CHAT,
        delete_at(("choices", 0, "logprobs")),
        "$.choices[0]",
    ),
    (
        "logprob as string",
        CHAT_COMPLETION,
        CHAT,
        set_at(("choices", 0, "logprobs", "content", 0, "logprob"), "-0.3"),
        "$.choices[0].logprobs",
    ),
    (
        "missing message role",
        CHAT_COMPLETION,
        CHAT,
        delete_at(("choices", 0, "message", "role")),
        "$.choices[0].message",
    ),
    (
        "usage tokens as float",
        CHAT_COMPLETION,
        CHAT,
        set_at(("usage", "total_tokens"), 29.5),
        "$.usage.total_tokens",
    ),
    (
        "bogus tool call type",
        CHAT_COMPLETION,
        CHAT,
        set_at(("choices", 1, "message", "tool_calls", 0, "type"), "bogus"),
        "$.choices[1].message.tool_calls[0]",
    ),
    (
        "function call without arguments",
        CHAT_COMPLETION,
        CHAT,
        delete_at(("choices", 1, "message", "tool_calls", 0, "function", "arguments")),
        "$.choices[1].message.tool_calls[0]",
    ),
    (
        "completion object",
        CHAT_COMPLETION_CHUNK,
        CHAT_CHUNKS[1],
        set_at(("object",), "chat.completion"),
        "$.object",
    ),
    (
        "bogus finish_reason",
        CHAT_COMPLETION_CHUNK,
        CHAT_CHUNKS[3],
        set_at(("choices", 0, "finish_reason"), "bogus"),
        "$.choices[0].finish_reason",
    ),
    (
        "missing delta",
        CHAT_COMPLETION_CHUNK,
        CHAT_CHUNKS[1],
        delete_at(("choices", 0, "delta")),
        "$.choices[0]",
    ),
    (
        "bogus role",
        CHAT_COMPLETION_CHUNK,
        CHAT_CHUNKS[0],
        set_at(("choices", 0, "delta", "role"), "robot"),
        "$.choices[0].delta.role",
    ),
    (
        "tool call chunk without index",
        CHAT_COMPLETION_CHUNK,
        CHAT_CHUNKS[2],
        delete_at(("choices", 0, "delta", "tool_calls", 0, "index")),
        "$.choices[0].delta.tool_calls[0]",
    ),
    ("usage as list", CHAT_COMPLETION_CHUNK, CHAT_CHUNKS[4], set_at(("usage",), []), "$.usage"),
    (
        "chat object",
        COMPLETION,
        COMPLETION_RESPONSE,
        set_at(("object",), "chat.completion"),
        "$.object",
    ),
    (
        "null finish_reason",
        COMPLETION,
        COMPLETION_RESPONSE,
        set_at(("choices", 0, "finish_reason"), None),
        "$.choices[0].finish_reason",
    ),
    (
        "tool_calls finish_reason",
        COMPLETION,
        COMPLETION_RESPONSE,
        set_at(("choices", 0, "finish_reason"), "tool_calls"),
        "$.choices[0].finish_reason",
    ),
    (
        "missing text",
        COMPLETION,
        COMPLETION_RESPONSE,
        delete_at(("choices", 0, "text")),
        "$.choices[0]",
    ),
    ("null usage", COMPLETION, COMPLETION_RESPONSE, set_at(("usage",), None), "$.usage"),
    (
        "bogus finish_reason",
        COMPLETION_CHUNK,
        COMPLETION_CHUNKS[0],
        set_at(("choices", 0, "finish_reason"), "bogus"),
        "$.choices[0].finish_reason",
    ),
    (
        "chunk object",
        COMPLETION_CHUNK,
        COMPLETION_CHUNKS[0],
        set_at(("object",), "chat.completion.chunk"),
        "$.object",
    ),
    (
        "base64 vector",
        EMBEDDING_LIST,
        EMBEDDINGS,
        set_at(("data", 0, "embedding"), "AACAPwAAAMA="),
        "$.data[0].embedding",
    ),
    (
        "string in vector",
        EMBEDDING_LIST,
        EMBEDDINGS,
        set_at(("data", 0, "embedding", 1), "0.1"),
        "$.data[0].embedding[1]",
    ),
    (
        "missing usage",
        EMBEDDING_LIST,
        EMBEDDINGS,
        delete_at(("usage",)),
        "$: 'usage' is a required property",
    ),
    (
        "list object",
        EMBEDDING_LIST,
        EMBEDDINGS,
        set_at(("data", 1, "object"), "list"),
        "$.data[1].object",
    ),
    (
        "float vector",
        EMBEDDING_LIST_BASE64,
        EMBEDDINGS_BASE64,
        set_at(("data", 0, "embedding"), [1.0]),
        "$.data[0].embedding",
    ),
    (
        "not base64",
        EMBEDDING_LIST_BASE64,
        EMBEDDINGS_BASE64,
        set_at(("data", 0, "embedding"), "AACAPw!="),
        "$.data[0].embedding",
    ),
    (
        "missing owned_by",
        MODEL_LIST,
        MODEL_LIST_RESPONSE,
        delete_at(("data", 0, "owned_by")),
        "$.data[0]",
    ),
    ("created as string", MODEL, MODEL_OBJECT, set_at(("created",), "yesterday"), "$.created"),
    ("bogus object", MODEL_LIST, MODEL_LIST_RESPONSE, set_at(("object",), "models"), "$.object"),
    (
        "missing param",
        ERROR,
        ERROR_RESPONSE,
        delete_at(("error", "param")),
        "$.error: 'param' is a required property",
    ),
    ("code as number", ERROR, ERROR_RESPONSE, set_at(("error", "code"), 404), "$.error.code"),
    (
        "bare error",
        ERROR,
        ERROR_RESPONSE["error"],
        lambda payload: None,
        "$: 'error' is a required property",
    ),
]


@pytest.mark.parametrize(
    ("schema_name", "payload", "mutate", "expected"),
    [case[1:] for case in INVALID],
    ids=[f"{case[1]}-{case[0]}" for case in INVALID],
)
def test_mutated_payloads_fail_naming_the_path(
    schema_name: str, payload: Payload, mutate: Callable[[Payload], None], expected: str
) -> None:
    mutated = copy.deepcopy(payload)
    mutate(mutated)
    with pytest.raises(AssertionError, match=f"not a valid OpenAI {schema_name}") as raised:
        validate(mutated, schema_name)
    assert expected in str(raised.value)


def test_error_message_lists_the_first_errors_only() -> None:
    payload = {"object": "list", "data": [{"id": f"m{i}"} for i in range(10)]}
    with pytest.raises(AssertionError) as raised:
        validate(payload, MODEL_LIST)
    message = str(raised.value)
    assert "(30 error(s))" in message
    assert "$.data[0]: 'object' is a required property" in message
    assert "... and 25 more" in message


def test_unknown_schema_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="CreateChatCompletionResponses"):
        validate({}, "CreateChatCompletionResponses")


def test_spec_is_openapi_3_1_with_the_default_dialect() -> None:
    spec = openai_schema.load_spec()
    assert spec["openapi"].startswith("3.1.")
    # No jsonSchemaDialect: OpenAPI 3.1's default, JSON Schema 2020-12 with OpenAPI annotations.
    assert "jsonSchemaDialect" not in spec


def test_constants_name_spec_schemas_or_documented_derivations() -> None:
    schemas = openai_schema.load_spec()["components"]["schemas"]
    for name in [
        *RESPONSE_SCHEMAS,
        MODEL,
        CHAT_COMPLETION_REQUEST,
        COMPLETION_REQUEST,
        EMBEDDING_REQUEST,
    ]:
        assert name in schemas, name
    derived = {name for name in schemas if name.startswith("derived.")}
    assert derived == {COMPLETION_CHUNK, EMBEDDING_LIST_BASE64, "derived.Embedding.base64"}


def test_transformations_leave_no_openapi_3_0_keywords() -> None:
    def walk(node: object) -> Iterator[Payload]:
        if isinstance(node, dict):
            yield node
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    schemas = openai_schema.load_spec()["components"]["schemas"]
    for found in walk(schemas):
        assert not isinstance(found.get("nullable"), bool)
        assert not isinstance(found.get("exclusiveMinimum"), bool)
        assert not isinstance(found.get("exclusiveMaximum"), bool)


def test_boolean_exclusive_minimum_is_translated() -> None:
    # beta: {minimum: 0, maximum: 2, exclusiveMinimum: true} in OpenAPI 3.0 style
    validate({"beta": 0.5}, "FineTuneDPOHyperparameters")
    validate({"beta": 2}, "FineTuneDPOHyperparameters")
    with pytest.raises(AssertionError, match=r"\$\.beta"):
        validate({"beta": 0}, "FineTuneDPOHyperparameters")


def reachable(name: str, schemas: dict[str, Payload]) -> set[str]:
    """The component schemas ``name`` refers to, transitively, itself included."""
    found: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.add(current)
        text = json.dumps(schemas[current])
        pending += [ref.split('"')[0] for ref in text.split('"$ref": "#/components/schemas/')[1:]]
    return found


def test_response_schemas_are_valid_json_schema_2020_12() -> None:
    schemas = openai_schema.load_spec()["components"]["schemas"]
    for name in set().union(*(reachable(response, schemas) for response in RESPONSE_SCHEMAS)):
        Draft202012Validator.check_schema(schemas[name])


def test_discriminators_are_decided_by_one_of_alone() -> None:
    """Every discriminated oneOf in a response names branches whose tag values are disjoint.

    jsonschema ignores ``discriminator``; this shows that ignoring it loses nothing.
    """
    schemas = openai_schema.load_spec()["components"]["schemas"]

    def tag_values(branch: Payload, tag: str) -> set[str]:
        target = schemas[branch["$ref"].rsplit("/", 1)[1]]
        assert tag in target["required"]
        return set(target["properties"][tag]["enum"])

    def discriminated(node: object) -> Iterator[Payload]:
        if isinstance(node, dict):
            if "discriminator" in node:
                yield node
            for value in node.values():
                yield from discriminated(value)
        elif isinstance(node, list):
            for item in node:
                yield from discriminated(item)

    names = set().union(*(reachable(response, schemas) for response in RESPONSE_SCHEMAS))
    found = [node for name in sorted(names) for node in discriminated(schemas[name])]
    assert found, "expected discriminated unions among the response schemas"
    for node in found:
        tag = node["discriminator"]["propertyName"]
        values = [tag_values(branch, tag) for branch in node["oneOf"]]
        assert sum(len(v) for v in values) == len(set().union(*values)), node


@pytest.mark.parametrize(
    ("schema_name", "expected"),
    [
        (
            CHAT_COMPLETION_REQUEST,
            {
                "messages",
                "model",
                "temperature",
                "top_p",
                "stream",
                "stream_options",
                "logprobs",
                "top_logprobs",
                "n",
                "stop",
                "seed",
                "max_tokens",
                "max_completion_tokens",
                "tools",
                "tool_choice",
                "response_format",
                "user",
                "metadata",
                "frequency_penalty",
                "presence_penalty",
                "logit_bias",
            },
        ),
        (
            COMPLETION_REQUEST,
            {
                "model",
                "prompt",
                "suffix",
                "echo",
                "best_of",
                "logprobs",
                "max_tokens",
                "stream",
                "stream_options",
                "stop",
                "seed",
            },
        ),
        (EMBEDDING_REQUEST, {"input", "model", "encoding_format", "dimensions", "user"}),
    ],
)
def test_request_schema_fields(schema_name: str, expected: set[str]) -> None:
    fields = request_schema_fields(schema_name)
    assert expected <= fields, expected - fields


def test_request_schema_fields_are_top_level_only() -> None:
    fields = request_schema_fields(CHAT_COMPLETION_REQUEST)
    assert "include_usage" not in fields  # inside stream_options
    assert "role" not in fields  # inside messages


def test_absent_spec_skips_the_calling_test(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(openai_schema, "SPEC_PATH", tmp_path / "openapi.yaml")
    openai_schema.load_spec.cache_clear()
    try:
        with pytest.raises(pytest.skip.Exception, match="spec is absent"):
            openai_schema.load_spec()
    finally:
        openai_schema.load_spec.cache_clear()
