"""Locust load of a HelixFlow gateway: streamed chat completions and embeddings with real API
keys over HTTPS, with the time to first token (TTFT) and the inter-token latency (ITL) recorded
as their own rows of locust's statistics (and CSV files).

    HELIXFLOW_API_KEY=hfx_... HELIXFLOW_CA=/path/to/ca.pem \\
        locust -f bench/locustfile.py --headless -u 50 -r 25 -t 30s \\
        --host https://localhost:8443 --csv /tmp/load

`bench/bench_load.py` starts the platform, runs this file and prints the figures.

Environment:
- ``HELIXFLOW_API_KEY``: one API key or several, comma separated (users take them in turn);
- ``HELIXFLOW_CA``: the CA bundle (PEM) that verifies the gateway's certificate (default:
  ``REQUESTS_CA_BUNDLE``, else certifi's);
- ``HELIXFLOW_CHAT_MODEL``, ``HELIXFLOW_EMBED_MODEL``: the models (SmolLM2-135M-Instruct,
  all-MiniLM-L6-v2);
- ``HELIXFLOW_MAX_TOKENS``: ``LOW,HIGH``, each chat's max_tokens drawn from it (16,32);
- ``HELIXFLOW_WAIT``: ``LOW,HIGH``, seconds a user waits between its requests (0.5,1.5);
- ``HELIXFLOW_EXPECT_429``: ``1`` when the keys carry rate limits: a 429 is then counted in its
  own row (type ``429``) instead of as a failure.

Rows (Type, Name): ``POST /v1/chat/completions`` (the whole stream, to [DONE]),
``POST /v1/embeddings``, ``TTFT chat`` (request sent -> first content event) and ``ITL chat``
(the gap between consecutive content events). A failure is an HTTP error status, a connection
error, an SSE error event, or a stream without its usage chunk or its [DONE]; its message is
the gateway's error message.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

import requests
from locust import User, between, events, task

CHAT_MODEL = os.environ.get("HELIXFLOW_CHAT_MODEL", "SmolLM2-135M-Instruct")
EMBED_MODEL = os.environ.get("HELIXFLOW_EMBED_MODEL", "all-MiniLM-L6-v2")
CHAT_PATH = "/v1/chat/completions"
EMBED_PATH = "/v1/embeddings"

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "Suggest a name for a grey cat.",
    "How many days are in a leap year?",
    "Tell me a fun fact about octopuses.",
    "Translate 'good morning' into Spanish.",
    "What does HTTP stand for?",
    "List two uses of salt.",
]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Inference servers batch requests to use the hardware well.",
    "A cup of tea in the afternoon.",
    "Rain is expected in the north tomorrow.",
    "Transformers attend to every earlier token.",
    "She sold her bicycle to buy a guitar.",
    "Prices rose by two per cent last quarter.",
    "The museum opens at nine on Sundays.",
]


def _pair(name: str, default: str) -> tuple[float, float]:
    low, high = (float(x) for x in os.environ.get(name, default).split(","))
    return low, high


KEYS = [k.strip() for k in os.environ.get("HELIXFLOW_API_KEY", "").split(",") if k.strip()]
MAX_TOKENS = tuple(int(x) for x in _pair("HELIXFLOW_MAX_TOKENS", "16,32"))
WAIT = _pair("HELIXFLOW_WAIT", "0.5,1.5")
EXPECT_429 = os.environ.get("HELIXFLOW_EXPECT_429", "") == "1"
CA: str | bool = os.environ.get("HELIXFLOW_CA") or os.environ.get("REQUESTS_CA_BUNDLE") or True
_next_user = itertools.count()


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _check_keys(environment: Any, **_: Any) -> None:
    if not KEYS:
        raise SystemExit("HELIXFLOW_API_KEY is not set (one key or several, comma separated)")


class ApiFailure(Exception):
    """A failed request: an HTTP error status, an SSE error event, a broken stream or answer."""


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class ApiUser(User):
    """A client of the OpenAI-compatible API: three streamed chats to one embeddings request."""

    wait_time = between(*WAIT)

    def on_start(self) -> None:
        self.base = (self.host or "").rstrip("/")
        # NOTE: a plain requests session (gevent-patched by locust) rather than locust's
        # HttpSession, so that each row's time is what this file decides (a chat's is the whole
        # stream, not the time to its response headers) and is reported exactly once.
        self.http = requests.Session()
        # NOTE: requests lets REQUESTS_CA_BUNDLE (and proxy variables) override a session's
        # `verify`; the gateway's own CA must win, and loopback needs no proxy.
        self.http.trust_env = False
        self.http.verify = CA
        key = KEYS[next(_next_user) % len(KEYS)]
        self.http.headers["Authorization"] = f"Bearer {key}"

    def on_stop(self) -> None:
        self.http.close()

    def _record(self, kind: str, name: str, started: float, length: int = 0,
                error: Exception | None = None, ms: float | None = None) -> None:  # fmt: skip
        self.environment.events.request.fire(
            request_type=kind, name=name, response_length=length, exception=error, context={},
            response_time=ms if ms is not None else (time.perf_counter() - started) * 1e3,
        )  # fmt: skip

    def _refused(self, response: requests.Response, name: str, started: float) -> None:
        if response.status_code == 429 and EXPECT_429:
            self._record("429", name, started)
        else:
            error = f"HTTP {response.status_code}: {_error_message(response)}"
            self._record("POST", name, started, error=ApiFailure(error))

    @task(3)
    def chat(self) -> None:
        body: dict[str, Any] = {
            "model": CHAT_MODEL, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": random.randint(*MAX_TOKENS),
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        }  # fmt: skip
        started = time.perf_counter()
        try:
            with self.http.post(self.base + CHAT_PATH, json=body, stream=True,
                                timeout=120) as response:  # fmt: skip
                if response.status_code != 200:
                    self._refused(response, CHAT_PATH, started)
                    return
                length = self._read_stream(response, started)
        except (requests.RequestException, ApiFailure, ValueError) as exc:
            self._record("POST", CHAT_PATH, started, error=exc)
            return
        self._record("POST", CHAT_PATH, started, length)

    def _read_stream(self, response: requests.Response, started: float) -> int:
        """Reads an SSE chat stream to [DONE], recording TTFT and ITL; returns its bytes."""
        length, last, usage = 0, None, None
        for line in response.iter_lines():
            length += len(line) + 1
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                if usage is None:
                    raise ApiFailure("stream without a usage chunk")
                return length
            event = json.loads(data)
            if "error" in event:
                raise ApiFailure(f"SSE error: {event['error'].get('message')}")
            usage = event.get("usage") or usage
            if any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
                now = time.perf_counter()
                if last is None:
                    self._record("TTFT", "chat", started, ms=(now - started) * 1e3)
                else:
                    self._record("ITL", "chat", started, ms=(now - last) * 1e3)
                last = now
        raise ApiFailure("stream ended without [DONE]")

    @task(1)
    def embeddings(self) -> None:
        count = random.randint(1, 4)
        text: str | list[str] = random.sample(SENTENCES, count) if count > 1 else \
            random.choice(SENTENCES)  # fmt: skip
        started = time.perf_counter()
        try:
            response = self.http.post(self.base + EMBED_PATH, timeout=120,
                                      json={"model": EMBED_MODEL, "input": text})  # fmt: skip
            if response.status_code != 200:
                self._refused(response, EMBED_PATH, started)
                return
            data = response.json()["data"]
            if len(data) != count:
                raise ApiFailure(f"{len(data)} embeddings for {count} inputs")
        except (requests.RequestException, ApiFailure, ValueError, KeyError) as exc:
            self._record("POST", EMBED_PATH, started, error=exc)
            return
        self._record("POST", EMBED_PATH, started, len(response.content))
