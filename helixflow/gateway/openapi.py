"""``GET /openapi.json``: the gateway's OpenAPI 3.1 document, made from the code itself.

Request bodies are the msgspec Structs the handlers decode (`schemas`), so the document cannot
drift from what is accepted; a test checks that its paths are exactly the app's routes.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from helixflow import __version__
from helixflow.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

__all__ = ["OPERATIONS", "document"]

# (method, path) -> (summary, request body Struct or None, authenticated)
OPERATIONS: dict[tuple[str, str], tuple[str, type[msgspec.Struct] | None, bool]] = {
    ("GET", "/health"): ("Liveness", None, False),
    ("GET", "/ready"): ("Readiness: auth and a healthy backend for every model", None, False),
    ("GET", "/metrics"): ("Prometheus metrics", None, False),
    ("GET", "/openapi.json"): ("This document", None, False),
    ("GET", "/v1/models"): ("Models the caller may use", None, True),
    ("GET", "/v1/models/{model}"): ("One model", None, True),
    ("POST", "/v1/chat/completions"): ("Chat completion (SSE with stream: true)",
                                       ChatCompletionRequest, True),
    ("POST", "/v1/completions"): ("Text completion (SSE with stream: true)",
                                  CompletionRequest, True),
    ("POST", "/v1/embeddings"): ("Embeddings", EmbeddingRequest, True),
    ("POST", "/tokenize"): ("Token ids of a prompt or chat", TokenizeRequest, True),
    ("POST", "/detokenize"): ("Text of token ids", DetokenizeRequest, True),
}  # fmt: skip

_ERROR = {"$ref": "#/components/schemas/Error"}


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once per process)."""
    structs = [s for _, s, _ in OPERATIONS.values() if s is not None]
    _, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    components["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"],
                                 "properties": {"message": {"type": "string"},
                                                "type": {"type": "string"},
                                                "param": {"type": ["string", "null"]},
                                                "code": {"type": ["string", "null"]}}}},
    }  # fmt: skip
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), (summary, struct, authenticated) in OPERATIONS.items():
        op: dict[str, Any] = {"summary": summary, "responses": {
            "200": {"description": "OK"},
            "default": {"description": "An OpenAI error object",
                        "content": {"application/json": {"schema": _ERROR}}}}}  # fmt: skip
        if struct is not None:
            ref = {"$ref": f"#/components/schemas/{struct.__name__}"}
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ref}}}  # fmt: skip
        if authenticated:
            op["security"] = [{"bearer": []}]
        if "{model}" in path:
            op["parameters"] = [{"name": "model", "in": "path", "required": True,
                                 "schema": {"type": "string"}}]  # fmt: skip
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "HelixFlow gateway", "version": __version__,
                 "description": "OpenAI-compatible API; errors are OpenAI error objects."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }  # fmt: skip
