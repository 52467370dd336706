"""An OpenAI-compatible chat-completions provider (OpenAI, vLLM, Ollama, llama.cpp, gateways).

Streams with Server-Sent Events over httpx (which runs under trio): answer
tokens become ``TextDelta``, reasoning tokens (``reasoning_content`` /
``reasoning``, as vLLM and others send them) ``ReasoningDelta``; streamed
tool-call fragments are assembled per ``index`` into complete ``ToolCall``
objects; usage is reported when the server includes it.

Failure behaviour:

- connect / read / write / pool timeouts (``httpx.Timeout``);
- retries with exponential backoff and full jitter on 429, 5xx and connection
  errors (honouring ``Retry-After``), but never once a chunk has been yielded:
  what the user already saw is never streamed twice;
- a circuit breaker per provider: after ``failure_threshold`` consecutive
  failures calls fail fast for ``reset_after`` seconds, then one trial call
  decides;
- cancellation closes the HTTP stream at once (the response is closed as the
  ``async with`` unwinds);
- every failure raises ``LLMError``; the API key is never logged or put in an
  error message.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any, cast

import attrs
import httpx
import trio

from ._exceptions import LLMError
from ._llm import (
    ChatMessage,
    ChatRequest,
    LLMChunk,
    ReasoningDelta,
    TextDelta,
    ToolCallsReady,
    ToolSpec,
    Usage,
)
from ._messages import ToolCall

logger = logging.getLogger("netra_actors.openai")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@attrs.frozen
class RetryPolicy:
    """How often and how patiently to retry a request that has not streamed anything yet."""

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter exponential backoff, at least ``Retry-After`` when the server gave one."""
        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        wait = random.uniform(0, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait


class CircuitBreaker:
    """Fails fast after repeated failures, so a dead endpoint is not hammered.

    Closed: calls go through; ``failure_threshold`` consecutive failures open
    it. Open: calls raise ``LLMError`` at once until ``reset_after`` seconds
    have passed. Then one trial call is let through (half-open): success
    closes the breaker, failure opens it again.
    """

    def __init__(self, failure_threshold: int = 5, reset_after: float = 30.0) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self.failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if trio.current_time() - self._opened_at >= self.reset_after:
            return "half_open"
        return "open"

    def before_call(self, name: str) -> None:
        """Raise ``LLMError`` when the breaker does not let a call through."""
        state = self.state
        if state == "open" or (state == "half_open" and self._trial):
            raise LLMError(
                f"provider {name!r} is unavailable (circuit open after {self.failures} failures)"
            )
        if state == "half_open":
            self._trial = True

    def release_trial(self) -> None:
        """A trial call ended without an outcome (cancelled): let another one through."""
        self._trial = False

    def record_success(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._trial = False

    def record_failure(self) -> None:
        self.failures += 1
        self._trial = False
        if self.failures >= self.failure_threshold or self._opened_at is not None:
            self._opened_at = trio.current_time()


class _Refused(Exception):
    """The endpoint refused the request itself (a 4xx that retrying will not fix)."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def message_to_openai(message: ChatMessage) -> dict[str, Any]:
    """A ``ChatMessage`` in the chat-completions wire format."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(dict(call.arguments))},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def tools_to_openai(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": dict(t.parameters),
            },
        }
        for t in tools
    ]


class ToolCallAssembler:
    """Collects streamed tool-call fragments (by ``index``) into complete calls (no I/O)."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[str, Any]] = {}

    def add(self, fragments: Sequence[Mapping[str, Any]]) -> None:
        for position, fragment in enumerate(fragments):
            index = fragment.get("index", position)
            part = self._parts.setdefault(index, {"id": None, "name": "", "arguments": ""})
            if fragment.get("id"):
                part["id"] = fragment["id"]
            function = fragment.get("function") or {}
            if function.get("name"):
                part["name"] += function["name"]
            if function.get("arguments"):
                part["arguments"] += function["arguments"]

    def __bool__(self) -> bool:
        return bool(self._parts)

    def calls(self) -> tuple[ToolCall, ...]:
        """The assembled calls in index order. Unparsable arguments are kept, flagged."""
        calls = []
        for index in sorted(self._parts):
            part = self._parts[index]
            call_id = part["id"] or f"call_{index}"
            raw = part["arguments"].strip() or "{}"
            try:
                arguments = json.loads(raw)
            except json.JSONDecodeError as exc:
                calls.append(
                    ToolCall(
                        call_id,
                        part["name"],
                        {},
                        invalid_arguments=f"arguments are not JSON: {exc}",
                    )
                )
                continue
            if not isinstance(arguments, dict):
                calls.append(
                    ToolCall(
                        call_id,
                        part["name"],
                        {},
                        invalid_arguments="arguments must be a JSON object",
                    )
                )
                continue
            calls.append(ToolCall(call_id, part["name"], arguments))
        return tuple(calls)


async def parse_sse_chunks(lines: AsyncIterator[str]) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON payloads of an SSE stream's ``data:`` lines, until ``[DONE]``.

    Raises:
        LLMError: a payload is not JSON, or the stream ends without ``[DONE]``.
    """
    data: list[str] = []
    async for line in lines:
        if line.startswith(":"):
            continue  # comment / keep-alive
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
            continue
        if line == "" and data:
            payload = "\n".join(data)
            data = []
            if payload == "[DONE]":
                # Read the body to its end, so the HTTP client's iterators finish
                # normally and the connection can be reused.
                async for _ in lines:
                    pass
                return
            try:
                yield json.loads(payload)
            except json.JSONDecodeError:
                raise LLMError(f"provider sent a malformed event: {payload[:200]!r}") from None
    if data and "\n".join(data) == "[DONE]":
        return
    raise LLMError("the provider's stream ended before it was complete")


class OpenAIChatProvider:
    """Chat completions from an OpenAI-compatible endpoint, streamed.

    ``base_url`` is the API root (``https://api.openai.com/v1``,
    ``http://127.0.0.1:8000/v1`` for vLLM, ``http://127.0.0.1:11434/v1`` for
    Ollama). ``api_key`` is sent as a bearer token and appears nowhere else.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        name: str = "openai",
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        client: httpx.AsyncClient | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._client = client
        self._extra = dict(extra_body or {})

    def __repr__(self) -> str:
        return f"OpenAIChatProvider(name={self.name!r}, url={self.url!r}, model={self.model!r})"

    def _client_or_new(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": [message_to_openai(m) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._extra,
        }
        if request.tools:
            body["tools"] = tools_to_openai(request.tools)
        return body

    def _headers(self, request: ChatRequest) -> dict[str, str]:
        headers = {"accept": "text/event-stream"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        if request.trace is not None:
            headers["traceparent"] = request.trace.to_traceparent()
        return headers

    def _scrub(self, text: str) -> str:
        """``text`` with the API key removed (upstream error bodies may quote it)."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "[redacted]")
        return text

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[LLMChunk, None]:
        """Stream one assistant turn; see the module docstring for failures and retries."""
        body, headers = self._body(request), self._headers(request)
        attempt = 0
        while True:
            self.breaker.before_call(self.name)
            streamed = False
            settled = False
            try:
                async with aclosing(self._attempt(body, headers)) as chunks:
                    async for chunk in chunks:
                        streamed = True
                        yield chunk
                self.breaker.record_success()
                settled = True
                return
            except _Retryable as exc:
                self.breaker.record_failure()
                settled = True
                if attempt >= self.retry.max_retries:
                    raise LLMError(
                        f"provider {self.name!r}: {exc} (after {attempt + 1} attempts)"
                    ) from None
                delay = self.retry.delay(attempt, exc.retry_after)
            except _Refused as exc:
                # The request itself was wrong (4xx): no sign the endpoint is unhealthy.
                self.breaker.record_success()
                settled = True
                raise LLMError(str(exc)) from None
            except httpx.TransportError as exc:
                self.breaker.record_failure()
                settled = True
                what = self._scrub(
                    f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                )
                if streamed or attempt >= self.retry.max_retries:
                    raise LLMError(
                        f"provider {self.name!r} failed: {what} (after {attempt + 1} attempts)"
                    ) from None
                delay = self.retry.delay(attempt)
            except LLMError:
                self.breaker.record_failure()
                settled = True
                raise
            finally:
                if not settled:
                    # Cancelled or closed early: the call says nothing about the endpoint,
                    # but a half-open breaker must let the next trial through.
                    self.breaker.release_trial()
            logger.info(
                "provider %s: retrying in %.2f s (attempt %d)", self.name, delay, attempt + 1
            )
            await trio.sleep(delay)
            attempt += 1

    async def _attempt(
        self, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncGenerator[LLMChunk, None]:
        client = self._client_or_new()
        async with client.stream(
            "POST", self.url, json=body, headers=headers, timeout=self._timeout
        ) as response:
            if response.status_code != 200:
                detail = (await response.aread())[:300].decode("utf-8", "replace")
                message = self._scrub(f"HTTP {response.status_code}: {detail}")
                if response.status_code in RETRYABLE_STATUS:
                    raise _Retryable(message, _retry_after(response))
                raise _Refused(f"provider {self.name!r} refused the request: {message}")
            tools = ToolCallAssembler()
            async with (
                aclosing(cast(AsyncGenerator[str, None], response.aiter_lines())) as lines,
                aclosing(parse_sse_chunks(lines)) as payloads,
            ):
                async for payload in payloads:
                    if "error" in payload:
                        raise LLMError(
                            self._scrub(f"provider {self.name!r} reported: {payload['error']}")
                        )
                    usage = payload.get("usage")
                    if usage:
                        yield Usage(
                            int(usage.get("prompt_tokens") or 0),
                            int(usage.get("completion_tokens") or 0),
                        )
                    for choice in payload.get("choices") or ():
                        delta = choice.get("delta") or {}
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                        if reasoning:
                            yield ReasoningDelta(reasoning)
                        if delta.get("content"):
                            yield TextDelta(delta["content"])
                        if delta.get("tool_calls"):
                            tools.add(delta["tool_calls"])
            if tools:
                yield ToolCallsReady(tools.calls())
