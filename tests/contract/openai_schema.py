"""OpenAI's own API spec as the contract for HelixFlow's wire format.

``openapi.yaml`` is OpenAI's public OpenAPI 3.1.0 description of its REST API, kept outside the
project at ``../shared/openai-openapi/`` (its README). This module loads it once and validates
responses and stream chunks against its component schemas with JSON Schema 2020-12, the schema
dialect of OpenAPI 3.1 (the document declares no other ``jsonSchemaDialect``). OpenAPI-only
keywords are annotations for validation: ``discriminator`` picks a ``oneOf`` branch that the
branches' own single-value ``type`` enums already decide, and ``x-*`` extensions, ``example`` and
``format`` (``unixtime``, ``float``, ...) constrain nothing.

The schemas are used as OpenAI wrote them, except for the named transformations in
``TRANSFORMATIONS`` (each one's docstring says which quirk forced it): two translate OpenAPI 3.0
keywords left in this 3.1 document, and two add *derived* schemas (names starting ``derived.``,
never OpenAI's own names) for wire shapes the spec's schemas do not describe. Each transformation
checks that the spec still has the shape it expects, so a new spec version fails loudly instead
of being patched wrongly.

Where the spec is absent (as on a user's machine), every function here skips the calling test.

Public API: ``validate``, ``request_schema_fields``, ``load_spec`` and the schema-name constants.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Final

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
# The spec sits next to the checkout (../shared/openai-openapi/); HELIXFLOW_OPENAPI_SPEC
# names another copy.
SPEC_PATH: Final = Path(
    os.environ.get("HELIXFLOW_OPENAPI_SPEC")
    or REPO_ROOT.parent / "shared" / "openai-openapi" / "openapi.yaml"
)
# NOTE: the parsed, transformed spec is cached as JSON (~30 ms to read instead of ~0.9 s to
# parse the YAML) inside pytest's own cache directory, and only once pytest has made it.
PYTEST_CACHE_DIR: Final = REPO_ROOT / ".pytest_cache"
CACHE_DIR: Final = PYTEST_CACHE_DIR / "d" / "openai_openapi"
SPEC_URI: Final = "urn:openai:openapi"

# Responses and stream chunks, as `data:` lines carry them.
CHAT_COMPLETION: Final = "CreateChatCompletionResponse"
CHAT_COMPLETION_CHUNK: Final = "CreateChatCompletionStreamResponse"
COMPLETION: Final = "CreateCompletionResponse"
# The spec describes a completions stream chunk as CreateCompletionResponse; see
# derive_completion_stream_chunk for the two nulls a real chunk carries.
COMPLETION_CHUNK: Final = "derived.CreateCompletionResponse.stream"
EMBEDDING_LIST: Final = "CreateEmbeddingResponse"
EMBEDDING_LIST_BASE64: Final = "derived.CreateEmbeddingResponse.base64"
MODEL_LIST: Final = "ListModelsResponse"
MODEL: Final = "Model"
ERROR: Final = "ErrorResponse"
# Requests.
CHAT_COMPLETION_REQUEST: Final = "CreateChatCompletionRequest"
COMPLETION_REQUEST: Final = "CreateCompletionRequest"
EMBEDDING_REQUEST: Final = "CreateEmbeddingRequest"

_MAX_ERRORS_SHOWN: Final = 5
_MAX_MESSAGE_CHARS: Final = 200

Schema = dict[str, Any]


# --- loading -------------------------------------------------------------------------------------

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _JsonYamlLoader(_BaseLoader):  # type: ignore[misc]
    """libyaml's safe loader, kept to JSON's data model: unquoted dates stay strings.

    NOTE: YAML 1.1 would turn an unquoted ``2024-10-01`` into a ``datetime.date``, which no JSON
    value can be and which would not equal the string a response carries.
    """

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, Any]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
    }


@functools.cache
def load_spec() -> dict[str, Any]:
    """The spec with ``TRANSFORMATIONS`` applied, parsed once per process (JSON-cached on disk)."""
    if not SPEC_PATH.is_file():
        pytest.skip(f"OpenAI's API spec is absent (expected at {SPEC_PATH})")
    raw = SPEC_PATH.read_bytes()
    key = hashlib.sha256(raw + Path(__file__).read_bytes()).hexdigest()[:16]
    cached = CACHE_DIR / f"{key}.json"
    try:
        return json.loads(cached.read_bytes())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        pass
    doc = yaml.load(raw, Loader=_JsonYamlLoader)
    schemas = doc["components"]["schemas"]
    for transformation in TRANSFORMATIONS:
        transformation(schemas)
    text = json.dumps(doc, separators=(",", ":"))
    if PYTEST_CACHE_DIR.is_dir():
        _replace_cache(cached, text)
    # NOTE: read back from JSON so a fresh parse and a cache hit are the same data (string keys).
    return json.loads(text)  # type: ignore[no-any-return]


def _replace_cache(path: Path, text: str) -> None:
    """Write ``path`` atomically and drop stale siblings; a read-only checkout just re-parses."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
        for stale in path.parent.glob("*.json"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError:
        pass


# --- transformations -----------------------------------------------------------------------------

# Keywords whose values are literal data, never subschemas.
_LITERAL_KEYWORDS: Final = frozenset(
    {"enum", "const", "default", "example", "examples", "discriminator", "required", "type"}
)
# Keywords whose values map arbitrary names (which may be "enum", "x-foo", ...) to subschemas.
_SCHEMA_MAPS: Final = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})


def _subschemas(schema: object) -> Iterator[Schema]:
    """``schema`` and every schema object nested in it (not literal values or extensions)."""
    if not isinstance(schema, dict):
        return
    yield schema
    for keyword, value in schema.items():
        if keyword in _SCHEMA_MAPS and isinstance(value, dict):
            for subschema in value.values():
                yield from _subschemas(subschema)
        elif keyword in _LITERAL_KEYWORDS or keyword.startswith("x-"):
            continue
        elif isinstance(value, dict):
            yield from _subschemas(value)
        elif isinstance(value, list):
            for item in value:
                yield from _subschemas(item)


def _all_subschemas(schemas: dict[str, Schema]) -> list[Schema]:
    """Every schema object under ``components/schemas``, listed before any is changed."""
    return [found for schema in schemas.values() for found in _subschemas(schema)]


def _expect(condition: bool, what: str) -> None:
    """Fail loudly when the spec no longer has the shape a transformation was written for."""
    if not condition:
        raise RuntimeError(f"openapi.yaml changed: expected {what}; revisit openai_schema.py")


def translate_nullable(schemas: dict[str, Schema]) -> None:
    """OpenAPI 3.0 ``nullable: true`` becomes ``anyOf: [<schema>, {type: "null"}]``.

    Quirk: the document says ``openapi: 3.1.0`` and mostly writes ``anyOf: [..., {type: null}]``,
    but ~110 schemas still carry 3.0's ``nullable``, which JSON Schema 2020-12 ignores; among them
    the chat chunk's ``finish_reason``, ``logprobs`` and ``usage``, which OpenAI sends as ``null``.
    NOTE: the wrap also admits ``null`` past an ``enum`` that lacks it (``finish_reason``), as the
    chunk's description intends; OpenAPI 3.0.3's stricter reading would forbid that null.
    ``nullable: false`` (the default) is dropped.
    """
    for schema in _all_subschemas(schemas):
        if "nullable" not in schema:
            continue
        if schema.pop("nullable") is True:
            rest = dict(schema)
            schema.clear()
            schema["anyOf"] = [rest, {"type": "null"}]


def translate_exclusive_bounds(schemas: dict[str, Schema]) -> None:
    """OpenAPI 3.0 ``minimum: m, exclusiveMinimum: true`` becomes ``exclusiveMinimum: m``.

    Quirk: a few schemas (``FineTuneDPOHyperparameters.beta`` and kin) keep 3.0's boolean form;
    2020-12 reads ``true`` as the number 1 and would reject every value up to 1. Same for maximum.
    """
    for schema in _all_subschemas(schemas):
        for exclusive, inclusive in (
            ("exclusiveMinimum", "minimum"),
            ("exclusiveMaximum", "maximum"),
        ):
            if not isinstance(schema.get(exclusive), bool):
                continue
            if schema.pop(exclusive):
                _expect(inclusive in schema, f"{inclusive!r} beside a boolean {exclusive!r}")
                schema[exclusive] = schema.pop(inclusive)


def derive_completion_stream_chunk(schemas: dict[str, Schema]) -> None:
    """Adds ``derived.CreateCompletionResponse.stream``, one chunk of a legacy completions stream.

    Quirk: the spec describes streamed completions with CreateCompletionResponse itself ("both the
    streamed and non-streamed response objects share the same shape"), whose ``finish_reason`` is
    never null and whose ``usage`` is never null. On the wire every chunk but the last has
    ``finish_reason: null``, and with ``stream_options.include_usage`` every chunk but the last has
    ``usage: null`` (ChatCompletionStreamOptions says so). The derived schema admits exactly those
    two nulls; CreateCompletionResponse itself stays strict.
    """
    chunk = copy.deepcopy(schemas[COMPLETION])
    choice = chunk["properties"]["choices"]["items"]
    _expect("finish_reason" in choice["required"], "a required completion finish_reason")
    _expect("usage" in chunk["properties"], "a usage property on CreateCompletionResponse")
    for properties, name in (
        (choice["properties"], "finish_reason"),
        (chunk["properties"], "usage"),
    ):
        properties[name] = {"anyOf": [properties[name], {"type": "null"}]}
    chunk["description"] = "One chunk of a completions stream (derived by openai_schema.py)."
    _add_derived(schemas, COMPLETION_CHUNK, chunk)


def derive_base64_embeddings(schemas: dict[str, Schema]) -> None:
    """Adds ``derived.CreateEmbeddingResponse.base64``, the answer to ``encoding_format: base64``.

    Quirk: CreateEmbeddingRequest offers ``encoding_format: base64``, then OpenAI sends each vector
    as a base64 string of float32s, but ``Embedding.embedding`` is described only as an array of
    numbers. The derived schemas replace just that property with a padded base64 string;
    CreateEmbeddingResponse stays float-only, so a float request answered in base64 still fails.
    """
    request_format = schemas[EMBEDDING_REQUEST]["properties"]["encoding_format"]
    _expect("base64" in request_format.get("enum", ()), "encoding_format to offer base64")
    embedding = copy.deepcopy(schemas["Embedding"])
    _expect(embedding["properties"]["embedding"].get("type") == "array", "a float-array embedding")
    embedding["properties"]["embedding"] = {
        "type": "string",
        "contentEncoding": "base64",
        "pattern": r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
    }
    _add_derived(schemas, "derived.Embedding.base64", embedding)
    response = copy.deepcopy(schemas[EMBEDDING_LIST])
    items = response["properties"]["data"]["items"]
    _expect(items == {"$ref": "#/components/schemas/Embedding"}, "data items to be Embedding")
    items["$ref"] = "#/components/schemas/derived.Embedding.base64"
    _add_derived(schemas, EMBEDDING_LIST_BASE64, response)


def _add_derived(schemas: dict[str, Schema], name: str, schema: Schema) -> None:
    _expect(name not in schemas, f"no schema named {name!r} in OpenAI's own spec")
    schemas[name] = schema


# Applied in this order to components/schemas after parsing.
TRANSFORMATIONS: Final[tuple[Callable[[dict[str, Schema]], None], ...]] = (
    translate_nullable,
    translate_exclusive_bounds,
    derive_completion_stream_chunk,
    derive_base64_embeddings,
)


# --- validation ----------------------------------------------------------------------------------


def _schemas() -> dict[str, Schema]:
    return load_spec()["components"]["schemas"]  # type: ignore[no-any-return]


def _schema(schema_name: str) -> Schema:
    """The named component schema; an unknown name is the caller's mistake (KeyError)."""
    try:
        return _schemas()[schema_name]
    except KeyError:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_PATH.name}") from None


@functools.cache
def _registry() -> Registry[Any]:
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, DRAFT202012.create_resource(load_spec())
    )
    return registry


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    _schema(schema_name)
    ref = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(ref, registry=_registry())


def _describe(error: ValidationError) -> str:
    """One line: the instance's JSON path and the most specific reason (inside anyOf/oneOf)."""
    specific = best_match([error]) or error
    message = specific.message
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
    return f"{specific.json_path}: {message}"


def validate(instance: object, schema_name: str) -> None:
    """Assert that ``instance`` conforms to ``#/components/schemas/<schema_name>``.

    Raises AssertionError naming the JSON path and reason of the first few errors, and KeyError
    for a name the spec does not have.
    """
    errors = list(_validator(schema_name).iter_errors(instance))
    if not errors:
        return
    lines = [_describe(error) for error in errors[:_MAX_ERRORS_SHOWN]]
    if len(errors) > _MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more")
    header = f"not a valid OpenAI {schema_name} ({len(errors)} error(s)):"
    raise AssertionError("\n  ".join([header, *lines]))


def request_schema_fields(schema_name: str) -> set[str]:
    """The top-level property names of a request schema such as CreateChatCompletionRequest.

    Follows ``$ref`` and takes the union over ``allOf`` (all parts apply) and ``anyOf``/``oneOf``
    (a field any branch names is one a client may send).
    """

    def fields(schema: Schema) -> set[str]:
        names = set(schema.get("properties", ()))
        if "$ref" in schema:
            prefix = "#/components/schemas/"
            _expect(schema["$ref"].startswith(prefix), f"a component $ref, not {schema['$ref']}")
            names |= fields(_schema(schema["$ref"].removeprefix(prefix)))
        for keyword in ("allOf", "anyOf", "oneOf"):
            for part in schema.get(keyword, ()):
                names |= fields(part)
        return names

    return fields(_schema(schema_name))
