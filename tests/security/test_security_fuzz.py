"""Schemathesis against the real gateway (real auth, real pool), from the OpenAPI document the
gateway serves at /openapi.json.

Method: for every operation of the document, Schemathesis' Hypothesis strategies generate
requests that follow the schema (positive) and, for operations with a body or a path
parameter, requests that break it (negative); `EXAMPLES` of each, well over 1,000 in all (the
test counts them). The generated bearer (a random string) is replaced by a valid API key,
except where a negative case broke the headers on purpose. To keep the real model's work
small, a chat or completion request is clamped before it is sent: max_tokens 2, n 1, at most
two prompts, no min_tokens or best_of. In about half the cases the model (in the body or the
path) is replaced by a served one, so generation, embeddings and tokenization really run; the
rest keep the generated name (a fast 404). Checks: no 5xx; status, content type and body
conform to the document (it documents one response schema, the error object, for every
non-200 answer); negative data is refused with a 4xx. The document gives 200 answers no
schema, so 200 bodies and SSE chunks are checked against OpenAI's own schemas (tests/contract)
instead, where that spec is present. Afterwards the stack's logs are checked for the key
and for tracebacks.
The Hypothesis seed is printed; HELIXFLOW_FUZZ_SEED replays a run.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from typing import Any

import pytest
import requests
import schemathesis
from contract import openai_schema
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from security_testing import CHAT, EMBED, Stack, assert_no_secret_in_logs

EXAMPLES = 100  # per operation and generation mode
SEED = int(os.environ.get("HELIXFLOW_FUZZ_SEED") or random.randrange(2**32))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]  # fmt: skip
GENERATING = ("/v1/chat/completions", "/v1/completions")
POOL_WORK = (*GENERATING, "/v1/embeddings", "/tokenize", "/detokenize")
# OpenAI's schema of each 200 body (whole, or per SSE chunk when streamed)
WHOLE = {"/v1/chat/completions": openai_schema.CHAT_COMPLETION,
         "/v1/completions": openai_schema.COMPLETION, "/v1/models": openai_schema.MODEL_LIST,
         "/v1/models/{model}": openai_schema.MODEL}  # fmt: skip
CHUNK = {"/v1/chat/completions": openai_schema.CHAT_COMPLETION_CHUNK,
         "/v1/completions": openai_schema.COMPLETION_CHUNK}  # fmt: skip


class Fuzz:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.port = stack.start_gateway()
        self.key = stack.key()
        self.document = stack.http(self.port).get("/openapi.json").json()
        self.session = requests.Session()
        self.verify = str(stack.pki["ca"])
        self.counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.failures: list[str] = []
        self.validated: collections.Counter[str] = collections.Counter()

    def send(self, case: Any, mode: GenerationMode, real: bool) -> None:
        _cheap(case, real)
        # NOTE: the generated bearer is a random string; the key replaces it unless a negative
        # case broke the headers on purpose.
        broken = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
        key = {} if broken else {"Authorization": f"Bearer {self.key}"}
        response = case.call(base_url=f"https://127.0.0.1:{self.port}", session=self.session,
                             headers=key, timeout=60, verify=self.verify)  # fmt: skip
        path = case.operation.path
        self.counts[(path, mode.value, response.status_code)] += 1
        try:
            case.validate_response(response, checks=CHECKS)
            if response.status_code == 200:
                self.validated[_conforms_to_openai(path, response)] += 1
        except (Exception, BaseExceptionGroup) as exc:  # collected: all are reported
            if len(self.failures) < 20:
                self.failures.append(f"{case.operation.method.upper()} {path} [{mode.value}] "
                                     f"-> {response.status_code}: {exc!r:.600}\n"
                                     f"  sent: {str(case.body)[:300]}\n"
                                     f"  got: {response.content[:300]!r}")  # fmt: skip


def _conforms_to_openai(path: str, response: schemathesis.Response) -> str:
    """A 200 body (or each SSE chunk) against OpenAI's schema of it (Schemathesis' response:
    headers are lists, the body is bytes); returns what was checked."""
    if not openai_schema.SPEC_PATH.is_file():
        return "nothing (no spec)"
    text = response.content.decode("utf-8")  # SSE and JSON are UTF-8
    if response.headers.get("content-type", [""])[0] == "text/event-stream":
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            assert event.startswith("data: ") and "\n" not in event, event[:200]
            chunk = json.loads(event[6:])
            if "error" not in chunk:
                openai_schema.validate(chunk, CHUNK[path])
        return "stream"
    if path == "/v1/embeddings":
        body = json.loads(text)
        b64 = bool(body["data"]) and isinstance(body["data"][0]["embedding"], str)
        openai_schema.validate(body, openai_schema.EMBEDDING_LIST_BASE64 if b64
                               else openai_schema.EMBEDDING_LIST)  # fmt: skip
    elif path in WHOLE:
        openai_schema.validate(json.loads(text), WHOLE[path])
    else:
        return "nothing (no schema)"
    return "whole"


def _cheap(case: Any, real: bool) -> None:
    """Bound the model's work; with `real`, name a served model so the request gets past
    routing to the pool."""
    path, body = case.operation.path, case.body
    if isinstance(body, dict):
        if path in GENERATING:
            body.update(max_tokens=2, n=1)
            for name in ("max_completion_tokens", "min_tokens", "best_of"):
                body.pop(name, None)
            if isinstance(body.get("prompt"), list):
                body["prompt"] = body["prompt"][:2]
        if real and "model" in body:
            body["model"] = EMBED if path == "/v1/embeddings" else CHAT
    if real and "model" in (case.path_parameters or {}):
        case.path_parameters["model"] = CHAT


@pytest.fixture(scope="module")
def fuzz(platform_stack: Stack) -> Fuzz:
    return Fuzz(platform_stack)


def _run(fuzz: Fuzz, operation: Any, mode: GenerationMode) -> None:
    """`EXAMPLES` generated requests to one operation in one mode."""

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode), real=st.booleans())
    def run(case: Any, real: bool) -> None:
        fuzz.send(case, mode, real)

    run()


def test_generated_requests_get_no_5xx_and_answers_match_the_document(fuzz: Fuzz) -> None:
    print(f"\nHypothesis seed {SEED} (HELIXFLOW_FUZZ_SEED={SEED} replays it)")
    started = time.monotonic()
    schema = schemathesis.openapi.from_dict(fuzz.document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {*GENERATING, "/v1/embeddings", "/detokenize"}
    for op in operations:
        modes = [GenerationMode.POSITIVE]
        if op.body or op.path_parameters:  # nothing to break in a bare GET
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            _run(fuzz, op, mode)
    total = sum(fuzz.counts.values())
    by_status = collections.Counter(status for _, _, status in fuzz.counts.elements())
    print(f"{total} requests in {time.monotonic() - started:.1f}s; by status "
          f"{dict(sorted(by_status.items()))}")  # fmt: skip
    assert not fuzz.failures, "\n".join(fuzz.failures)
    assert total >= 1000, total
    # Real work was done too: generation, embeddings and tokenization that succeeded.
    served = {p: n for (p, _, s), n in fuzz.counts.items() if s == 200 and p in POOL_WORK}
    print(f"answered by the pool: {served}; 200s checked against OpenAI's schemas: "
          f"{dict(fuzz.validated)}")  # fmt: skip
    assert served.get("/v1/chat/completions", 0) >= 1 and sum(served.values()) >= 10, served
    assert not any(status >= 500 for status in by_status)
    if openai_schema.SPEC_PATH.is_file():
        assert fuzz.validated["whole"] >= 10, fuzz.validated  # (streams: a few per run)


def test_the_fuzzed_services_logged_no_key_and_no_traceback(fuzz: Fuzz) -> None:
    assert_no_secret_in_logs([fuzz.stack.dir], [fuzz.key, fuzz.key.split("_", 2)[2]])
    for log in fuzz.stack.dir.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.name
