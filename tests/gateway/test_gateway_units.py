"""The gateway's parts without processes: configuration, request schemas against OpenAI's,
the OpenAPI document against the routes, the circuit breaker, input splitting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from contract.openai_schema import (
    CHAT_COMPLETION_REQUEST,
    COMPLETION_REQUEST,
    EMBEDDING_REQUEST,
    request_schema_fields,
)

from helixflow.errors import ConfigError, InvalidRequestError
from helixflow.gateway.app import Gateway
from helixflow.gateway.backends import CircuitBreaker
from helixflow.gateway.config import GatewayConfig, load_config
from helixflow.gateway.openai_pool import split_inputs
from helixflow.gateway.openapi import OPERATIONS, document
from helixflow.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(ChatCompletionRequest, CHAT_COMPLETION_REQUEST), (CompletionRequest, COMPLETION_REQUEST),
     (EmbeddingRequest, EMBEDDING_REQUEST)],
)  # fmt: skip
def test_every_openai_request_field_is_accepted(ours: type[msgspec.Struct], theirs: str) -> None:
    missing = request_schema_fields(theirs) - set(ours.__struct_fields__)
    assert not missing, f"{ours.__name__} refuses OpenAI fields {sorted(missing)}"


def test_openapi_document_matches_the_routes() -> None:
    async def routes() -> set[tuple[str, str]]:
        # NOTE: in a running loop: the pools' grpc.aio channels need one (and no test may rely
        # on a default loop left behind by an earlier one).
        return set(Gateway(GatewayConfig(insecure_no_auth=True), {}).routes)

    served = asyncio.run(routes()) | {("GET", "/v1/models/{model}")}
    assert served == set(OPERATIONS)
    doc = document()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == served
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = chat["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(doc["components"]["schemas"][ref]["properties"]) == set(
        ChatCompletionRequest.__struct_fields__
    )


def test_config_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "helixflow.toml"
    path.write_text(
        '[gateway]\nmax_body_bytes = 2048\n\n[[models]]\nid = "m"\naliases = ["gpt-x"]\n'
        'backends = [{ pool = "10.0.0.1:1" }, { openai = "https://u/v1", api_key_env = "K" }]\n'
    )
    config = load_config({"port": 9443}, {"K": "secret", "PORT": "7000", "REDIS_URL": "redis://r"},
                         config_path=str(path))  # fmt: skip
    assert config.port == 9443 and config.max_body_bytes == 2048  # flags win over env
    assert config.redis_url == "redis://r" and config.models[0].aliases == ["gpt-x"]
    config = load_config({}, {"INFERENCE_POOL_URL": "a:1, b:2"})
    assert config.pool_urls == ["a:1", "b:2"] and config.models == []


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[gateway]\nport = 'x'\n", {}, "port"),
        ("[gatway]\n", {}, "unknown section"),
        ("[gateway]\ntls = 1\n", {}, "unknown [gateway] key"),
        ('[[models]]\nid = "m"\nbackends = [{ pool = "a:1", openai = "u" }]\n', {}, "either"),
        ('[[models]]\nid = "m"\nbackends = []\n', {}, "backends"),
        ('[[models]]\nid = "m"\nbackends = [{ openai = "u", api_key_env = "NOPE" }]\n', {},
         "NOPE is not set"),
        ("not toml [", {}, "not valid TOML"),
        ("", {"PORT": "http"}, "PORT"),
        ("", {"TLS_CERT": "c.pem"}, "TLS_CERT and TLS_KEY"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                    message: str) -> None:  # fmt: skip
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config({}, env, config_path=str(path))
    assert message in caught.value.message


def test_circuit_breaker_opens_cools_down_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    breaker = CircuitBreaker(failures=2, cooldown=5.0)
    breaker.failure()
    assert breaker.allows()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allows()
    now[0] += 5.0
    assert breaker.state == "half-open" and breaker.allows()
    breaker.begin()
    assert not breaker.allows()  # one trial at a time
    breaker.failure()
    assert breaker.state == "open"  # the trial failed: another cool-down
    now[0] += 5.0
    breaker.begin()
    breaker.success()
    assert breaker.state == "closed" and breaker.allows()


def test_prompts_and_inputs_are_split_and_checked() -> None:
    assert split_inputs("a", "prompt") == ["a"]
    assert split_inputs(["a", "b"], "prompt") == ["a", "b"]
    assert split_inputs([1, 2, 3], "prompt") == [[1, 2, 3]]
    assert split_inputs([[1], [2, 3]], "input") == [[1], [2, 3]]
    for bad in ([], ["a", 1], [[1], "a"], [[]]):
        with pytest.raises(InvalidRequestError) as caught:
            split_inputs(bad, "input")
        assert caught.value.param == "input"
