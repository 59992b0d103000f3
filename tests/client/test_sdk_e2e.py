"""The SDK against the real platform: pool (SmolLM2, MiniLM), auth and a gateway over TLS, as
processes (tests/gateway/stack_testing.py), one stack for the module."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TypedDict

import httpx
import pytest
from gateway.stack_testing import ADMIN_PASSWORD, CHAT, EMBED, Stack

from helixflow import errors as server_errors
from helixflow.client import (
    APIConnectionError,
    AsyncHelixFlow,
    AuthenticationError,
    BadRequestError,
    HelixFlow,
    NotFoundError,
    PermissionDeniedError,
)
from helixflow.client.types import ChatCompletionChunk, ChatMessage

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Urls(TypedDict):
    base_url: str
    auth_url: str


@pytest.fixture(scope="module")
def stack(platform_stack: Stack) -> Stack:
    return platform_stack


@pytest.fixture(scope="module")
def urls(stack: Stack) -> Urls:
    return {"base_url": f"https://127.0.0.1:{stack.start_gateway()}",
            "auth_url": f"http://127.0.0.1:{stack.auth_http}"}  # fmt: skip


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.key()


@pytest.fixture
def sdk(stack: Stack, urls: Urls, key: str) -> Iterator[HelixFlow]:
    with HelixFlow(api_key=key, ca_bundle=stack.pki["ca"], max_retries=0, **urls) as made:
        yield made


def test_chat_whole_and_streamed(sdk: HelixFlow) -> None:
    reply = sdk.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=16,
                                        temperature=0)  # fmt: skip
    text = reply.choices[0].message.content or ""
    assert "Paris" in text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    with sdk.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=16, temperature=0,
                                     stream=True, stream_options={"include_usage": True},
                                     ) as stream:  # fmt: skip
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert stream.response.is_closed and stream.request_id
    # a reply's message goes back into the conversation as it is
    follow = sdk.chat.completions.create(model=CHAT, max_tokens=4, messages=[
        ChatMessage(role="user", content="Say hi."), reply.choices[0].message,
        ChatMessage(role="user", content="Again.")])  # fmt: skip
    assert follow.choices[0].message.content


def test_completions_embeddings_models_tokens(sdk: HelixFlow) -> None:
    reply = sdk.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=6,
                                   temperature=0)  # fmt: skip
    assert reply.choices[0].text.strip()
    streamed = sdk.completions.create(model=CHAT, prompt="The capital of France is",
                                      max_tokens=6, temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    vectors = sdk.embeddings.create(model=EMBED, input=["a cat", "tax law"])
    assert [len(v.embedding) for v in vectors.data] == [384, 384]
    assert vectors.usage is not None and vectors.usage.prompt_tokens > 0
    assert {m.id for m in sdk.models.list()} == {CHAT, EMBED}
    assert sdk.models.retrieve(EMBED).id == EMBED
    tokens = sdk.tokenize(model=CHAT, prompt="Hello world")
    assert tokens.count == len(tokens.tokens) > 0
    assert sdk.detokenize(model=CHAT, tokens=tokens.tokens).endswith("Hello world")


def test_async_chat_whole_and_streamed(stack: Stack, urls: Urls, key: str) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncHelixFlow(api_key=key, ca_bundle=stack.ssl_context(), **urls) as sdk:
            reply = await sdk.chat.completions.create(model=CHAT, messages=QUESTION,
                                                      max_tokens=12, temperature=0)  # fmt: skip
            stream = await sdk.chat.completions.create(model=CHAT, messages=QUESTION,
                                                       max_tokens=12, temperature=0,
                                                       stream=True)  # fmt: skip
            async with stream:
                parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return reply.choices[0].message.content or "", "".join(parts)

    whole, streamed = asyncio.run(main())
    assert "Paris" in whole and streamed == whole


def test_errors_are_typed(stack: Stack, urls: Urls, sdk: HelixFlow) -> None:
    with HelixFlow(api_key="hfx_notakey0_" + "x" * 43, ca_bundle=stack.pki["ca"],
                   max_retries=0, **urls) as stranger, \
            pytest.raises(AuthenticationError) as denied:  # fmt: skip
        stranger.models.list()
    assert denied.value.status == 401 and denied.value.request_id
    assert isinstance(denied.value, server_errors.AuthenticationError)
    with pytest.raises(NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    with pytest.raises(BadRequestError) as bad:
        sdk.chat.completions.create(model=CHAT, messages=QUESTION, temperature=3.5)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"


def test_the_ca_bundle_is_needed(urls: Urls, key: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("HELIXFLOW_CA", raising=False)
    with HelixFlow(api_key=key, **urls) as unverified, \
            pytest.raises(APIConnectionError) as raised:  # fmt: skip
        unverified.models.list()
    assert raised.value.code == "tls_verification_failed" and "ca_bundle" in raised.value.message


def test_login_refresh_and_api_keys(stack: Stack, urls: Urls) -> None:
    with HelixFlow(ca_bundle=stack.pki["ca"], max_retries=0, **urls) as sdk:
        pair = sdk.auth.login("root", ADMIN_PASSWORD)
        assert pair.token_type == "Bearer" and pair.expires_in > 0
        me = sdk.auth.me()
        assert (me.kind, me.username, me.role) == ("token", "root", "admin")
        assert sdk.models.list().data  # the login's token works at the gateway too

        renewed = sdk.auth.refresh()
        assert renewed.refresh_token != pair.refresh_token
        assert sdk.auth.me().username == "root"  # with the new access token

        made = sdk.api_keys.create(name="sdk test", scopes=[f"model:{EMBED}"], rpm_limit=100)
        assert made.key.startswith("hfx_") and made.scopes == [f"model:{EMBED}"]
        assert made.key not in repr(made)
        assert made.id in {k.id for k in sdk.api_keys.list()}
        assert sdk.api_keys.get(made.id).name == "sdk test"
        with HelixFlow(api_key=made.key, ca_bundle=stack.pki["ca"], max_retries=0,
                       **urls) as scoped:  # fmt: skip
            assert len(scoped.embeddings.create(model=EMBED, input="x").data) == 1
            with pytest.raises(PermissionDeniedError):
                scoped.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=1)
            revoked = sdk.api_keys.revoke(made.id)
            assert revoked.revoked_at is not None
            with pytest.raises(AuthenticationError):
                scoped.embeddings.create(model=EMBED, input="x")

        # an access token that stops working is renewed once, by the client itself
        access = sdk._core.credentials.access_token
        httpx.post(f"{urls['auth_url']}/v1/auth/revoke", json={"token": access},
                   headers={"authorization": f"Bearer {access}"}).raise_for_status()  # fmt: skip
        assert sdk.auth.me().username == "root"
        assert sdk._core.credentials.access_token != access

        last = sdk._core.credentials.refresh_token
        sdk.auth.logout()
    with HelixFlow(refresh_token=last, max_retries=0, **urls) as ended, \
            pytest.raises(AuthenticationError) as refused:  # fmt: skip
        ended.auth.refresh()  # the session is over on the server
    assert refused.value.code == "invalid_refresh_token"
