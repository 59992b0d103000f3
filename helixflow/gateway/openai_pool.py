"""OpenAI requests on an inference pool: request → `GenerateRequest`, and the pool's stream →
OpenAI responses and SSE chunks (chat and text completions, with logprobs, `n` and usage).

The shapes follow OpenAI's API reference (a contract test validates them against its spec):
a streamed chat choice opens with ``delta: {"role": "assistant", "content": ""}``, each token
batch is a ``delta.content``, the finishing chunk has an empty delta and ``finish_reason``; with
``stream_options.include_usage`` every chunk carries ``usage: null`` and one last chunk has
``choices: []`` and the usage.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import msgspec

from helixflow._proto import inference_pb2 as pb
from helixflow.errors import (
    HelixFlowError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    UpstreamTimeoutError,
)
from helixflow.gateway.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest

__all__ = [
    "ChoiceAccumulator",
    "chat_request",
    "completion_request",
    "pool_error",
]

FINGERPRINT = "fp_helixflow"
_PARAM = re.compile(r"^'([A-Za-z0-9_.\[\]]+)': ")
_UNSUPPORTED_CHAT = ("audio", "functions", "function_call", "modalities", "moderation",
                     "prediction", "tools", "web_search_options")  # fmt: skip


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def pool_error(exc: grpc.aio.AioRpcError, backend: str) -> HelixFlowError:
    """A pool's gRPC error as the HelixFlowError a client gets."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        match = _PARAM.match(details)
        param = match.group(1) if match else None
        return InvalidRequestError(details[match.end():] if match else details, param=param)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(details, param="model", code="model_not_found")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamTimeoutError(f"{backend} did not answer in time")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(f"{backend} is at capacity; retry later", code="overloaded")
    return OverloadedError(f"{backend} is unavailable ({code.name})", code="backend_unavailable")


def _text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"content parts of type {str(part.get('type'))[:40]!r} are not supported by "
                "this model; send text", param="messages")  # fmt: skip
        parts.append(part["text"])
    return "".join(parts)


def _sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
              logprobs: bool, top_logprobs: int | None) -> pb.SamplingParams:  # fmt: skip
    params = pb.SamplingParams(ignore_eos=req.ignore_eos, logprobs=logprobs)
    for name in ("temperature", "top_p", "min_p", "seed", "n", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "min_tokens"):  # fmt: skip
        value = getattr(req, name)
        if value is not None:
            setattr(params, name, value)
    if req.top_k is not None:
        params.top_k = max(req.top_k, 0)  # -1 (vLLM's "off") is 0 here
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if top_logprobs is not None:
        params.top_logprobs = top_logprobs
    if req.stop is not None:
        params.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    if req.stop_token_ids:
        params.stop_token_ids.extend(req.stop_token_ids)
    for token, bias in (req.logit_bias or {}).items():
        try:
            params.logit_bias[int(token)] = bias
        except ValueError:
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {token[:20]!r}",
                                      param="logit_bias") from None  # fmt: skip
    return params


def chat_request(req: ChatCompletionRequest, model: str, request_id: str) -> pb.GenerateRequest:
    """The pool request of a chat completion; InvalidRequestError for what a local model
    cannot do."""
    for name in _UNSUPPORTED_CHAT:
        if getattr(req, name) not in (None, [], {}):
            raise InvalidRequestError(f"`{name}` is not supported by model {model!r}", param=name)
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise InvalidRequestError("only response_format type 'text' is supported by this model",
                                  param="response_format")  # fmt: skip
    messages = [pb.ChatMessage(role="system" if m.role == "developer" else m.role,
                               content=_text(m)) for m in req.messages]  # fmt: skip
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens  # fmt: skip
    top = req.top_logprobs if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return pb.GenerateRequest(
        request_id=request_id, model=model, chat=pb.Chat(messages=messages),
        params=_sampling(req, max_tokens, bool(req.logprobs), top),
    )  # fmt: skip


def completion_request(req: CompletionRequest, prompt: str | list[int], model: str,
                       request_id: str) -> pb.GenerateRequest:  # fmt: skip
    """The pool request of one prompt of a text completion."""
    if req.suffix:
        raise InvalidRequestError("`suffix` is not supported by this model", param="suffix")
    if req.echo:
        raise InvalidRequestError("`echo` is not supported by this model", param="echo")
    if req.best_of not in (None, 1, req.n):
        raise InvalidRequestError("`best_of` other than n is not supported", param="best_of")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
    logprobs = req.logprobs is not None
    params = _sampling(req, max_tokens, logprobs, req.logprobs if logprobs else None)
    if isinstance(prompt, str):
        return pb.GenerateRequest(request_id=request_id, model=model, prompt=prompt,
                                  params=params)  # fmt: skip
    return pb.GenerateRequest(request_id=request_id, model=model,
                              prompt_token_ids=pb.TokenIds(ids=prompt), params=params)  # fmt: skip


def split_inputs(value: Any, param: str) -> list[str | list[int]]:
    """A `prompt`/`input` (str, list of str, token ids, list of token id lists) as a list of
    prompts; InvalidRequestError if empty or mixed."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if all(isinstance(p, int) for p in value):
        return [list(value)]
    if all(isinstance(p, str) for p in value) or all(isinstance(p, list) for p in value):
        if any(isinstance(p, list) and not p for p in value):
            raise InvalidRequestError(f"{param} has an empty token list", param=param)
        return list(value)
    message = (f"{param} must be a string, a list of strings, a list of token ids or a list "
               "of token id lists, not a mix")  # fmt: skip
    raise InvalidRequestError(message, param=param)


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    """`prompt` as a list of prompts (text or token ids)."""
    return split_inputs(req.prompt, "prompt")


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def chat_logprobs(items: Any) -> dict[str, Any]:
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": _token_bytes(lp.token),
         "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                           "bytes": _token_bytes(t.token)} for t in lp.top]}
        for lp in items], "refusal": None}  # fmt: skip


class ChoiceAccumulator:
    """Collects one choice of a non-streamed response."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[Any] = []
        self.finish_reason: str | None = None

    def add(self, message: Any, usage: Usage) -> None:
        """Take one pool message of this choice (and the request's usage, if it has it)."""
        self.text.append(message.text)
        self.logprobs.extend(message.logprobs)
        if message.finished:
            self.finish_reason = message.finish_reason or "stop"
        if message.HasField("usage"):
            usage.add(message.usage)


def completion_logprobs(items: list[Any], offset: int) -> dict[str, Any]:
    """Legacy completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for lp in items:
        tokens.append(lp.token)
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in items],
            "text_offset": offsets}  # fmt: skip


def usage_json(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


class Usage:
    """Token counts of one request, summed over its pool calls."""

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0

    def add(self, usage: Any) -> None:
        self.prompt += usage.prompt_tokens
        self.completion += usage.completion_tokens


async def chat_chunks(
    stream: AsyncIterator[Any], *, model: str, include_usage: bool, usage: Usage,
    encode: Callable[[Any], bytes] = msgspec.json.encode,
) -> AsyncIterator[bytes]:  # fmt: skip
    """SSE event bytes of a streamed chat completion (``data: {...}\\n\\n``, then [DONE])."""
    cid, created = new_id("chatcmpl"), int(time.time())
    opened: set[int] = set()
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(choice: dict[str, Any]) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": FINGERPRINT, "choices": [choice], **extra}
        return b"data: " + encode(body) + b"\n\n"  # fmt: skip

    async for message in stream:
        index = message.index
        if index not in opened:
            opened.add(index)
            yield chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})  # fmt: skip
        if message.text or message.logprobs:
            yield chunk({"index": index, "delta": {"content": message.text},
                         "logprobs": chat_logprobs(message.logprobs) if message.logprobs
                         else None, "finish_reason": None})  # fmt: skip
        if message.finished:
            yield chunk({"index": index, "delta": {}, "logprobs": None,
                         "finish_reason": message.finish_reason or "stop"})  # fmt: skip
        if message.HasField("usage"):
            usage.add(message.usage)
    if include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": FINGERPRINT, "choices": [],
                "usage": usage_json(usage.prompt, usage.completion)}  # fmt: skip
        yield b"data: " + encode(body) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def chat_response(stream: AsyncIterator[Any], *, model: str, usage: Usage,
                        logprobs: bool) -> dict[str, Any]:  # fmt: skip
    """The ChatCompletion object of a non-streamed request."""
    choices: dict[int, ChoiceAccumulator] = {}
    async for message in stream:
        choices.setdefault(message.index, ChoiceAccumulator()).add(message, usage)
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": FINGERPRINT,
        "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(a.text),
                                             "refusal": None, "annotations": []},
                     "logprobs": chat_logprobs(a.logprobs) if logprobs else None,
                     "finish_reason": a.finish_reason or "stop"}
                    for i, a in sorted(choices.items())],
        "usage": usage_json(usage.prompt, usage.completion),
    }  # fmt: skip


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(stream number, message) from several streams as they come; closing the merged
    iterator cancels whatever still runs."""
    if len(streams) == 1:
        async for message in streams[0]:
            yield 0, message
        return
    queue: asyncio.Queue[tuple[int, Any] | BaseException | None] = asyncio.Queue()

    async def pump(number: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for message in stream:
                await queue.put((number, message))
        except BaseException as exc:  # handed to the consumer, re-raised there
            await queue.put(exc)
            return
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def completion_chunks(
    streams: list[AsyncIterator[Any]], *, n: int, model: str, include_usage: bool,
    usage: Usage, encode: Callable[[Any], bytes] = msgspec.json.encode,
) -> AsyncIterator[bytes]:  # fmt: skip
    """SSE event bytes of a streamed text completion (several prompts: index = p * n + i)."""
    cid, created = new_id("cmpl"), int(time.time())
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    offsets: dict[int, int] = {}
    async for number, message in merge(streams):
        index = number * n + message.index
        if message.text or message.logprobs or message.finished:
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(message.text)
            choice = {"text": message.text, "index": index,
                      "logprobs": completion_logprobs(list(message.logprobs), offset)
                      if message.logprobs else None,
                      "finish_reason": (message.finish_reason or "stop") if message.finished
                      else None}  # fmt: skip
            body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": FINGERPRINT, "choices": [choice], **extra}  # fmt: skip
            yield b"data: " + encode(body) + b"\n\n"
        if message.HasField("usage"):
            usage.add(message.usage)
    if include_usage:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": FINGERPRINT, "choices": [],
                "usage": usage_json(usage.prompt, usage.completion)}  # fmt: skip
        yield b"data: " + encode(body) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def completion_response(streams: list[AsyncIterator[Any]], *, n: int, model: str,
                              usage: Usage, logprobs: bool) -> dict[str, Any]:  # fmt: skip
    """The Completion object of a non-streamed text completion."""
    choices: dict[int, ChoiceAccumulator] = {}
    async for number, message in merge(streams):
        choices.setdefault(number * n + message.index, ChoiceAccumulator()).add(message, usage)
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
        "model": model, "system_fingerprint": FINGERPRINT,
        "choices": [{"text": "".join(a.text), "index": i,
                     "logprobs": completion_logprobs(a.logprobs, 0) if logprobs else None,
                     "finish_reason": a.finish_reason or "stop"}
                    for i, a in sorted(choices.items())],
        "usage": usage_json(usage.prompt, usage.completion),
    }  # fmt: skip
