"""``OpenAIChatProvider`` against a fake OpenAI-compatible server (tests/fake_openai.py).

The provider alone (``stream_chat``) and through ``LLMManager``: streaming of
text, reasoning, usage and tool calls; the request it sends; retries, timeouts,
the circuit breaker and cancellation; that the API key never leaks. Plus the
pure helpers (``ToolCallAssembler``, ``parse_sse_chunks``, ``message_to_openai``)
and one run through the runtime for invalid tool-call arguments.

Real sockets on 127.0.0.1 and the real clock: every test is bounded by
``trio.fail_after`` and waits for requests, chunks or disconnects, never for
time (except the breaker's ``reset_after``, which *is* a duration).

``test_no_async_generator_is_abandoned`` guards against the provider leaving
its async iterators (or httpx's) suspended for the garbage collector: every
stream is closed when it ends, fails or is cancelled.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any, Literal

import pytest
import trio
from fake_openai import (
    Drop,
    FakeOpenAI,
    HttpError,
    Pause,
    Raw,
    Stream,
    answer_stream,
    chunk,
    open_fake_openai,
    reasoning,
    role,
    split,
    text,
    tool_call_events,
    tool_call_stream,
    tool_fragment,
    unused_port,
    usage,
)

from netra_actors import (
    ChatMessage,
    ChatRequest,
    CircuitBreaker,
    Config,
    LLMError,
    LLMManager,
    OpenAIChatProvider,
    ReasoningDelta,
    RetryPolicy,
    Runtime,
    TextDelta,
    ToolCall,
    ToolCallsReady,
    ToolSpec,
    UnifiedTraceContext,
    Usage,
)
from netra_actors._llm import LLMChunk
from netra_actors._openai import ToolCallAssembler, message_to_openai, parse_sse_chunks
from netra_actors.testing import check_lifecycle

pytestmark = [pytest.mark.network]

#: Upper bound for every test; each takes well under a second.
TIMEOUT = 15
KEY = "sk-test-Zq8dHq2w0rUNIQUE-KEY-41"
FAST = RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.05)
HI = ChatRequest((ChatMessage("user", "hi"),))
RETRY_LOG = "retrying in"
Framing = Literal["chunked", "close"]


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible server on 127.0.0.1."""
    async with open_fake_openai() as server:
        yield server


@asynccontextmanager
async def provider_for(
    base_url: str, *, retry: RetryPolicy = FAST, **options: Any
) -> AsyncIterator[OpenAIChatProvider]:
    """An ``OpenAIChatProvider`` (model "m", fast retries), its HTTP client closed on exit."""
    provider = OpenAIChatProvider(base_url=base_url, model="m", retry=retry, **options)
    try:
        yield provider
    finally:
        with trio.CancelScope(shield=True):
            await provider.aclose()


async def collect(
    provider: OpenAIChatProvider, request: ChatRequest = HI
) -> tuple[list[LLMChunk], LLMError | None]:
    """Every chunk of one ``stream_chat``, and the ``LLMError`` that ended it (if one did)."""
    chunks: list[LLMChunk] = []
    try:
        async with aclosing(provider.stream_chat(request)) as stream:  # type: ignore[type-var]
            async for item in stream:
                chunks.append(item)
    except LLMError as exc:
        return chunks, exc
    return chunks, None


async def chunks_of(provider: OpenAIChatProvider, request: ChatRequest = HI) -> list[LLMChunk]:
    """The chunks of a ``stream_chat`` that must succeed."""
    chunks, error = await collect(provider, request)
    assert error is None, f"unexpected {error!r} after {chunks!r}"
    return chunks


async def failure(provider: OpenAIChatProvider, request: ChatRequest = HI) -> LLMError:
    """The ``LLMError`` of a ``stream_chat`` that must fail without yielding anything."""
    chunks, error = await collect(provider, request)
    assert error is not None, f"expected an LLMError, got {chunks!r}"
    assert chunks == []
    return error


def texts(chunks: Sequence[LLMChunk]) -> list[str]:
    return [c.text for c in chunks if isinstance(c, TextDelta)]


def retry_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if RETRY_LOG in r.getMessage()]


# --- streaming -----------------------------------------------------------------------------------


async def test_text_tokens_stream_as_text_deltas_in_order(fake: FakeOpenAI) -> None:
    """Answer tokens become ``TextDelta`` chunks in order, then the usage chunk a ``Usage``."""
    tokens = ["The", " answer", " is", " 1", "4", "."]
    fake.script(answer_stream(*tokens, tokens_used=(12, 6)))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks = await chunks_of(provider)
    assert chunks == [*(TextDelta(t) for t in tokens), Usage(12, 6)]
    assert [r.outcome for r in fake.requests] == ["complete"]


async def test_reasoning_content_and_reasoning_become_reasoning_deltas(fake: FakeOpenAI) -> None:
    """``reasoning_content`` (vLLM, DeepSeek) and ``reasoning`` tokens are ``ReasoningDelta``s."""
    fake.script(
        Stream(
            [
                role(),
                reasoning("Let me "),
                reasoning("think.", key="reasoning"),
                text("Done"),
                usage(3, 4),
            ]
        )
    )
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks = await chunks_of(provider)
    assert chunks == [
        ReasoningDelta("Let me "),
        ReasoningDelta("think."),
        TextDelta("Done"),
        Usage(3, 4),
    ]


async def test_sse_comments_event_lines_multiline_data_and_crlf(fake: FakeOpenAI) -> None:
    """Keep-alive comments and ``event:`` lines are skipped; multi-line data and CRLF parse."""
    two_lines = 'data: {"choices": [{"index": 0, "delta":\ndata: {"content": "joined"}}]}\n\n'
    fake.script(
        Stream(
            [
                Raw(": keep-alive\n\n"),
                role(),
                Raw("event: message\n" + two_lines),
                Raw('data:{"choices": [{"index": 0, "delta": {"content": " crlf"}}]}\r\n\r\n'),
                chunk({"content": ""}),
                usage(1, 2),
            ]
        )
    )
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks = await chunks_of(provider)
    assert chunks == [TextDelta("joined"), TextDelta(" crlf"), Usage(1, 2)]


async def test_no_usage_chunk_means_no_usage(fake: FakeOpenAI) -> None:
    """A server that sends no usage (some ignore ``stream_options``) yields no ``Usage``."""
    fake.script(answer_stream("ok", tokens_used=None))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            assert await chunks_of(provider) == [TextDelta("ok")]


async def test_parallel_tool_calls_are_assembled_from_interleaved_fragments(
    fake: FakeOpenAI,
) -> None:
    """Two calls streamed as interleaved fragments, arguments cut mid-token: one ``ToolCallsReady``."""
    calls = [
        ("call_a", "calculator", '{"expression": "2+3*4"}'),
        ("call_b", "sleep", '{"seconds": 0.5}'),
    ]
    events = tool_call_events(calls, pieces=4)
    # The fake really interleaves them, and really cuts inside tokens.
    indices = [e["choices"][0]["delta"]["tool_calls"][0]["index"] for e in events]
    assert indices == [0, 1] * 5
    assert split(calls[0][2], 4)[0] == '{"expr'
    fake.script(
        Stream([role(), text("Let me compute."), *events, chunk({}, "tool_calls"), usage(9, 7)])
    )
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks = await chunks_of(provider)
    ready = [c for c in chunks if isinstance(c, ToolCallsReady)]
    assert ready == [
        ToolCallsReady(
            (
                ToolCall("call_a", "calculator", {"expression": "2+3*4"}),
                ToolCall("call_b", "sleep", {"seconds": 0.5}),
            )
        )
    ]
    assert texts(chunks) == ["Let me compute."]
    assert Usage(9, 7) in chunks


async def test_tool_calls_come_back_in_index_order(fake: FakeOpenAI) -> None:
    """Fragments of index 1 arriving before index 0 still give the calls in index order."""
    fake.script(
        Stream(
            [
                role(),
                tool_fragment(1, call_id="call_second", name="fail", arguments='{"message": "x"}'),
                tool_fragment(0, call_id="call_first", name="calcu"),
                tool_fragment(0, name="lator", arguments='{"expression": "1"}'),
            ]
        )
    )
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks = await chunks_of(provider)
    assert chunks == [
        ToolCallsReady(
            (
                ToolCall("call_first", "calculator", {"expression": "1"}),
                ToolCall("call_second", "fail", {"message": "x"}),
            )
        )
    ]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"expression": "2+', "arguments are not JSON"),
        ("[1, 2]", "arguments must be a JSON object"),
        ('"2+3"', "arguments must be a JSON object"),
        ("", None),
    ],
    ids=["truncated-json", "array", "string", "empty"],
)
async def test_invalid_tool_arguments_are_flagged_not_raised(
    fake: FakeOpenAI, arguments: str, expected: str | None
) -> None:
    """Arguments that are not a JSON object give a call with ``invalid_arguments`` set (empty: ``{}``)."""
    fake.script(tool_call_stream(("call_x", "calculator", arguments)))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks = await chunks_of(provider)
    (ready,) = [c for c in chunks if isinstance(c, ToolCallsReady)]
    (call,) = ready.calls
    assert (call.call_id, call.name, dict(call.arguments)) == ("call_x", "calculator", {})
    if expected is None:
        assert call.invalid_arguments is None
    else:
        assert call.invalid_arguments is not None
        assert call.invalid_arguments.startswith(expected)


# --- what the provider sends ---------------------------------------------------------------------


CALC_SPEC = ToolSpec(
    "calculator",
    "Evaluate an arithmetic expression.",
    {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
)


async def test_request_body_is_chat_completions_format(fake: FakeOpenAI) -> None:
    """Model, stream, include_usage, messages (tool calls, tool results), tools, extra_body."""
    trace = UnifiedTraceContext.new_root()
    request = ChatRequest(
        (
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "what is 2+3*4?"),
            ChatMessage(
                "assistant",
                tool_calls=(ToolCall("call_1", "calculator", {"expression": "2+3*4"}),),
            ),
            ChatMessage("tool", "14", tool_call_id="call_1", name="calculator"),
            ChatMessage("assistant", "It is 14."),
            ChatMessage("user", "thanks"),
        ),
        (CALC_SPEC,),
        trace=trace,
    )
    fake.script(answer_stream("ok"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, extra_body={"temperature": 0}) as provider:
            await chunks_of(provider, request)
    (sent,) = fake.requests
    assert (sent.method, sent.target) == ("POST", "/v1/chat/completions")
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["accept"] == "text/event-stream"
    assert sent.headers["traceparent"] == trace.to_traceparent()
    body = sent.body
    arguments = body["messages"][2]["tool_calls"][0]["function"].pop("arguments")
    assert isinstance(arguments, str)
    assert json.loads(arguments) == {"expression": "2+3*4"}
    assert body == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "what is 2+3*4?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "calculator"}}
                ],
            },
            {"role": "tool", "content": "14", "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is 14."},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "calculator",
                    "description": "Evaluate an arithmetic expression.",
                    "parameters": CALC_SPEC.parameters,
                },
            }
        ],
    }


async def test_request_model_overrides_and_no_tools_key_without_tools(fake: FakeOpenAI) -> None:
    """``ChatRequest.model`` wins over the provider's model; no tools, no ``tools`` key or trace."""
    fake.script(answer_stream("a"), answer_stream("b"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            await chunks_of(provider)
            await chunks_of(provider, ChatRequest(HI.messages, model="other-model"))
    first, second = fake.requests
    assert (first.body["model"], second.body["model"]) == ("m", "other-model")
    assert "tools" not in first.body
    assert "traceparent" not in first.headers


@pytest.mark.parametrize(
    ("api_key", "header"),
    [(None, None), ("", None), (KEY, f"Bearer {KEY}")],
    ids=["no-key", "empty-key", "key"],
)
async def test_authorization_header_only_with_a_key(
    fake: FakeOpenAI, api_key: str | None, header: str | None
) -> None:
    """``Authorization: Bearer KEY`` is sent when a key is given, and no header otherwise."""
    fake.script(answer_stream("ok"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, api_key=api_key) as provider:
            await chunks_of(provider)
    assert fake.requests[0].authorization == header


async def test_api_key_never_in_errors_repr_or_logs(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Across every failure kind the key is in no ``LLMError``, ``repr(provider)`` or log record."""
    caplog.set_level(logging.DEBUG)
    breaker = CircuitBreaker(failure_threshold=100)
    retry = RetryPolicy(max_retries=1, base_delay=0.01, max_delay=0.05)
    fake.script(
        HttpError(400, "bad request"),
        HttpError(500),
        HttpError(503, retry_after="0"),
        Drop(),
        Drop(reset=False),
        Stream([role(), "{not json"]),
        answer_stream("a", "b", done=False),
        Stream([role(), text("a"), Pause(2.0), text("b")]),
        HttpError(401, "invalid api key"),
    )
    errors: list[LLMError] = []
    with trio.fail_after(TIMEOUT):
        async with provider_for(
            fake.base_url, api_key=KEY, retry=retry, breaker=breaker, timeout=0.3
        ) as provider:
            assert KEY not in repr(provider)
            assert KEY not in str(provider)
            while fake.pending:
                _, error = await collect(provider)
                assert error is not None
                errors.append(error)
            assert len(errors) == 7
            breaker.failures, breaker.failure_threshold = 0, 1
            fake.script(HttpError(500))
            errors.append(await failure(provider))  # opens the breaker
            errors.append(await failure(provider))  # fails fast: circuit open
        async with provider_for(
            f"http://127.0.0.1:{unused_port()}/v1", api_key=KEY, retry=retry
        ) as refused:
            errors.append(await failure(refused))
    assert "circuit open" in str(errors[-2])
    assert "ConnectError" in str(errors[-1])
    for error in errors:
        assert KEY not in str(error)
        assert KEY not in repr(error)
        assert error.__cause__ is None or KEY not in repr(error.__cause__)
    assert caplog.records, "nothing was logged: the capture is not working"
    assert retry_logs(caplog)
    for record in caplog.records:
        assert KEY not in record.getMessage(), record
        assert KEY not in repr(record.args), record
        assert record.exc_text is None or KEY not in record.exc_text
    assert KEY not in caplog.text
    assert all(r.authorization == f"Bearer {KEY}" for r in fake.requests)


async def test_api_key_echoed_by_the_server_is_not_in_the_error(fake: FakeOpenAI) -> None:
    """A 401 whose body quotes the key gives an ``LLMError`` without the key."""
    fake.script(HttpError(401, f"Incorrect API key provided: {KEY}."))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, api_key=KEY) as provider:
            error = await failure(provider)
    assert "401" in str(error)
    assert KEY not in str(error)


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        HttpError(429, "rate limited", retry_after="0"),
        HttpError(500),
        HttpError(502),
        HttpError(503),
        HttpError(504),
        HttpError(408),
    ],
    ids=lambda r: str(r.status),
)
async def test_retryable_status_then_success(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, reply: HttpError
) -> None:
    """429 (``Retry-After: 0``), 5xx and 408 are retried: the second request succeeds."""
    caplog.set_level(logging.INFO, logger="netra_actors.openai")
    fake.script(reply, answer_stream("ok"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks = await chunks_of(provider)
    assert chunks == [TextDelta("ok"), Usage(10, 5)]
    first, second = fake.requests
    assert (first.outcome, second.outcome) == ("error_status", "complete")
    assert first.raw_body == second.raw_body
    assert len(retry_logs(caplog)) == 1


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
async def test_connection_dropped_before_any_byte_is_retried(fake: FakeOpenAI, reset: bool) -> None:
    """A connection reset (or closed) before the response head is retried."""
    fake.script(Drop(reset=reset), answer_stream("ok"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            assert texts(await chunks_of(provider)) == ["ok"]
    assert [r.outcome for r in fake.requests] == ["dropped", "complete"]


async def test_truncated_before_any_chunk_is_retried(fake: FakeOpenAI) -> None:
    """A chunked body cut off before any chunk was yielded is a connection error: retried."""
    fake.script(Stream([role()], done=False), answer_stream("ok"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            assert texts(await chunks_of(provider)) == ["ok"]
    assert [r.outcome for r in fake.requests] == ["truncated", "complete"]


async def test_connection_refused_is_retried_then_gives_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connection refused: ``max_retries`` retries (each logged), then ``LLMError``."""
    caplog.set_level(logging.INFO, logger="netra_actors.openai")
    retry = RetryPolicy(max_retries=2, base_delay=0.01, max_delay=0.05)
    with trio.fail_after(TIMEOUT):
        async with provider_for(f"http://127.0.0.1:{unused_port()}/v1", retry=retry) as provider:
            error = await failure(provider)
    assert "ConnectError" in str(error)
    assert len(retry_logs(caplog)) == 2


async def test_status_retries_give_up_after_max_retries(fake: FakeOpenAI) -> None:
    """Three 503s with ``max_retries=2``: ``LLMError`` naming the status and the 3 attempts."""
    retry = RetryPolicy(max_retries=2, base_delay=0.01, max_delay=0.05)
    fake.script(*[HttpError(503, "overloaded")] * 3, answer_stream("never"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=retry) as provider:
            error = await failure(provider)
    assert "HTTP 503" in str(error)
    assert "overloaded" in str(error)
    assert "3 attempts" in str(error)
    assert len(fake.requests) == 3
    assert fake.pending == 1


async def test_connection_error_retries_give_up_naming_the_attempts(fake: FakeOpenAI) -> None:
    """Three dropped connections with ``max_retries=2``: the ``LLMError`` names the 3 attempts."""
    retry = RetryPolicy(max_retries=2, base_delay=0.01, max_delay=0.05)
    fake.script(Drop(), Drop(), Drop())
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=retry) as provider:
            error = await failure(provider)
    assert len(fake.requests) == 3
    assert "3 attempts" in str(error), str(error)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_fail_at_once_without_retry(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """4xx (other than 408/409/425/429): ``LLMError`` at once, one request, no retry."""
    caplog.set_level(logging.INFO, logger="netra_actors.openai")
    fake.script(HttpError(status, "you did it wrong"), answer_stream("never"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            error = await failure(provider)
    assert f"HTTP {status}" in str(error)
    assert "you did it wrong" in str(error)
    assert len(fake.requests) == 1
    assert retry_logs(caplog) == []


async def test_retry_after_is_honoured(fake: FakeOpenAI) -> None:
    """``Retry-After: 0.4`` makes the retry wait at least 0.4 s, whatever the backoff says."""
    retry = RetryPolicy(max_retries=1, base_delay=0.01, max_delay=2.0)
    fake.script(HttpError(429, retry_after="0.4"), answer_stream("ok"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=retry) as provider:
            await chunks_of(provider)
    first, second = fake.requests
    assert second.received_at - first.received_at >= 0.4


async def test_retry_after_is_capped_by_max_delay(fake: FakeOpenAI) -> None:
    """A huge ``Retry-After`` waits only ``max_delay``."""
    retry = RetryPolicy(max_retries=1, base_delay=0.01, max_delay=0.05)
    fake.script(HttpError(429, retry_after="3600"), answer_stream("ok"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=retry) as provider:
            await chunks_of(provider)
    first, second = fake.requests
    assert second.received_at - first.received_at < 2.0


def test_retry_delay_is_full_jitter_within_bounds() -> None:
    """``RetryPolicy.delay``: within [0, min(max, base*2^n)], at least min(Retry-After, max)."""
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    for attempt in range(8):
        for _ in range(50):
            assert 0 <= policy.delay(attempt) <= min(4.0, 0.5 * 2**attempt)
        assert 1.5 <= policy.delay(attempt, retry_after=1.5) <= 4.0
        assert policy.delay(attempt, retry_after=100) == 4.0


# --- failures after streaming, malformed streams, timeouts ---------------------------------------


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_never_retried_once_tokens_were_streamed(fake: FakeOpenAI, framing: Framing) -> None:
    """Two tokens, then the stream is cut: the 2 ``TextDelta`` then ``LLMError``; 1 request."""
    fake.script(
        answer_stream("one ", "two ", done=False, tokens_used=None, framing=framing),
        answer_stream("retried!"),
    )
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks, error = await collect(provider)
    assert chunks == [TextDelta("one "), TextDelta("two ")]
    assert error is not None
    assert len(fake.requests) == 1
    assert fake.pending == 1


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_truncated_stream_without_done_is_an_error(
    fake: FakeOpenAI, framing: Framing
) -> None:
    """A stream that ends without ``[DONE]`` (nothing streamed, no retries left) is ``LLMError``."""
    fake.script(Stream([role()], done=False, framing=framing))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=RetryPolicy(max_retries=0)) as provider:
            await failure(provider)
    assert [r.outcome for r in fake.requests] == ["truncated"]


async def test_close_framed_stream_ending_without_done_is_an_error(fake: FakeOpenAI) -> None:
    """A ``connection: close`` body that ends cleanly but without ``[DONE]``: ``LLMError`` after the tokens."""
    fake.script(answer_stream("partial", framing="close", done=False))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks, error = await collect(provider)
    assert texts(chunks) == ["partial"]
    assert error is not None
    assert "before it was complete" in str(error)


async def test_close_framed_stream_with_done_succeeds(fake: FakeOpenAI) -> None:
    """The same framing with ``[DONE]`` is a normal stream."""
    fake.script(answer_stream("a", "b", framing="close"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            assert texts(await chunks_of(provider)) == ["a", "b"]


@pytest.mark.parametrize("tokens_first", [0, 2], ids=["at-start", "after-tokens"])
async def test_malformed_data_line_is_an_error(fake: FakeOpenAI, tokens_first: int) -> None:
    """A ``data:`` line that is not JSON: ``LLMError`` ("malformed"), never retried."""
    fake.script(
        Stream([role(), *(text(f"t{i}") for i in range(tokens_first)), "{not json", text("x")]),
        answer_stream("retried!"),
    )
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks, error = await collect(provider)
    assert texts(chunks) == [f"t{i}" for i in range(tokens_first)]
    assert error is not None
    assert "malformed" in str(error)
    assert len(fake.requests) == 1


async def test_error_event_in_the_stream_is_an_error(fake: FakeOpenAI) -> None:
    """A ``data: {"error": ...}`` event mid-stream (vLLM, gateways) is ``LLMError``."""
    fake.script(Stream([role(), text("a"), {"error": {"message": "model crashed", "code": 500}}]))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            chunks, error = await collect(provider)
    assert texts(chunks) == ["a"]
    assert error is not None
    assert "model crashed" in str(error)


async def test_read_timeout_before_any_token_is_retried_then_fails(fake: FakeOpenAI) -> None:
    """No byte within ``timeout``: retried, then ``LLMError`` (ReadTimeout); the fake saw both go."""
    retry = RetryPolicy(max_retries=1, base_delay=0.01, max_delay=0.05)
    slow = Stream([role(), text("late")], head_delay=3.0)
    fake.script(slow, slow)
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=retry, timeout=0.2) as provider:
            start = trio.current_time()
            error = await failure(provider)
            elapsed = trio.current_time() - start
        for request in fake.requests:
            await request.ended.wait()
    assert "ReadTimeout" in str(error)
    assert elapsed < 2.5
    assert [r.outcome for r in fake.requests] == ["disconnected", "disconnected"]


async def test_read_timeout_after_tokens_is_not_retried(fake: FakeOpenAI) -> None:
    """Tokens then a stall longer than ``timeout``: the tokens, then ``LLMError``; 1 request."""
    fake.script(
        Stream([role(), text("a"), text("b"), Pause(3.0), text("c")]), answer_stream("retried!")
    )
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, timeout=0.2) as provider:
            chunks, error = await collect(provider)
    assert texts(chunks) == ["a", "b"]
    assert error is not None
    assert "ReadTimeout" in str(error)
    assert len(fake.requests) == 1


# --- the circuit breaker -------------------------------------------------------------------------


NO_RETRY = RetryPolicy(max_retries=0)


async def open_breaker(
    fake: FakeOpenAI, provider: OpenAIChatProvider, breaker: CircuitBreaker
) -> float:
    """Fail ``failure_threshold`` calls with HTTP 500; the time by which the breaker was open."""
    fake.script(*[HttpError(500, "down")] * breaker.failure_threshold)
    for _ in range(breaker.failure_threshold):
        assert "HTTP 500" in str(await failure(provider))
    assert breaker.state == "open"
    return trio.current_time()


async def test_breaker_opens_fails_fast_then_a_trial_closes_it(fake: FakeOpenAI) -> None:
    """2 failures open it; calls fail fast with no request; after ``reset_after`` a success closes it."""
    breaker = CircuitBreaker(failure_threshold=2, reset_after=0.3)
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=NO_RETRY, breaker=breaker) as provider:
            opened = await open_breaker(fake, provider, breaker)
            error = await failure(provider)
            assert "circuit open" in str(error)
            assert len(fake.requests) == 2
            # The breaker's state is a function of time: wait out reset_after itself.
            await trio.sleep_until(opened + breaker.reset_after)
            assert breaker.state == "half_open"
            fake.script(answer_stream("back"))
            assert texts(await chunks_of(provider)) == ["back"]
            assert len(fake.requests) == 3
            assert (breaker.state, breaker.failures) == ("closed", 0)
            fake.script(answer_stream("again"))
            assert texts(await chunks_of(provider)) == ["again"]


async def test_breaker_failed_trial_opens_it_again(fake: FakeOpenAI) -> None:
    """A failing half-open trial opens the breaker again at once (one failure suffices)."""
    breaker = CircuitBreaker(failure_threshold=2, reset_after=0.3)
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=NO_RETRY, breaker=breaker) as provider:
            opened = await open_breaker(fake, provider, breaker)
            await trio.sleep_until(opened + breaker.reset_after)
            fake.script(HttpError(500, "still down"))
            assert "still down" in str(await failure(provider))
            assert breaker.state == "open"
            assert "circuit open" in str(await failure(provider))
            assert len(fake.requests) == 3


async def test_breaker_half_open_lets_only_one_trial_through(fake: FakeOpenAI) -> None:
    """While the half-open trial streams, a second call fails fast; the trial's success closes it."""
    breaker = CircuitBreaker(failure_threshold=2, reset_after=0.3)
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=NO_RETRY, breaker=breaker) as provider:
            opened = await open_breaker(fake, provider, breaker)
            await trio.sleep_until(opened + breaker.reset_after)
            fake.script(Stream([role(), text("a"), Pause(0.3), text("b")]))
            streaming = trio.Event()
            trial: list[LLMChunk] = []

            async def run_trial() -> None:
                async with aclosing(provider.stream_chat(HI)) as stream:  # type: ignore[type-var]
                    async for item in stream:
                        trial.append(item)
                        streaming.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_trial)
                await streaming.wait()
                assert "circuit open" in str(await failure(provider))
            assert texts(trial) == ["a", "b"]
            assert len(fake.requests) == 3
            assert breaker.state == "closed"


async def test_breaker_recovers_after_a_cancelled_trial(fake: FakeOpenAI) -> None:
    """A cancelled half-open trial does not wedge the breaker: a later call gets through."""
    breaker = CircuitBreaker(failure_threshold=2, reset_after=0.3)
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, retry=NO_RETRY, breaker=breaker) as provider:
            opened = await open_breaker(fake, provider, breaker)
            await trio.sleep_until(opened + breaker.reset_after)
            fake.script(Stream([role(), text("a"), Pause(5.0), text("b")]))
            with trio.CancelScope() as scope:
                async with aclosing(provider.stream_chat(HI)) as stream:  # type: ignore[type-var]
                    async for _ in stream:
                        scope.cancel()
            await fake.requests[-1].ended.wait()
            await trio.sleep_until(trio.current_time() + breaker.reset_after)
            fake.script(answer_stream("recovered"))
            chunks, error = await collect(provider)
    assert error is None, f"the breaker is wedged: {error}"
    assert texts(chunks) == ["recovered"]


# --- cancellation --------------------------------------------------------------------------------


def slow_stream(tokens: int = 40, delay: float = 0.25) -> Stream:
    """A stream of ``tokens`` answer tokens, ``delay`` s apart (10 s by default)."""
    return Stream([role(), *(text(f"t{i} ") for i in range(tokens))], delay=delay)


async def test_cancelling_the_consumer_closes_the_http_stream_at_once(fake: FakeOpenAI) -> None:
    """Cancelling the task iterating ``stream_chat`` mid-stream: the server sees the disconnect promptly."""
    fake.script(slow_stream())
    first = trio.Event()
    seen: list[LLMChunk] = []

    async def consume() -> None:
        async for item in provider.stream_chat(HI):
            seen.append(item)
            first.set()

    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await first.wait()
                cancelled_at = trio.current_time()
                nursery.cancel_scope.cancel()
            (request,) = fake.requests
            await request.ended.wait()
    assert request.outcome == "disconnected"
    assert request.ended_at is not None
    assert request.ended_at - cancelled_at < 0.5
    assert request.ended_at - request.received_at < 3.0  # the stream would take 10 s
    assert len(seen) < 10


async def test_closing_the_manager_stream_early_closes_the_http_stream(fake: FakeOpenAI) -> None:
    """Leaving ``aclosing(manager.stream(...))`` after one chunk: the server sees the disconnect."""
    fake.script(slow_stream())
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url) as provider:
            manager = LLMManager([provider])
            async with aclosing(manager.stream(HI)) as stream:
                async for item in stream:
                    assert item == TextDelta("t0 ")
                    break
            closed_at = trio.current_time()
            (request,) = fake.requests
            await request.ended.wait()
    assert request.outcome == "disconnected"
    assert request.ended_at is not None
    assert request.ended_at - closed_at < 0.5


async def test_cancelling_during_retry_backoff_sends_no_more_requests(fake: FakeOpenAI) -> None:
    """A call cancelled while it waits to retry makes no further request."""
    retry = RetryPolicy(max_retries=3, base_delay=5.0, max_delay=5.0)
    fake.script(HttpError(429, retry_after="5"), answer_stream("never"))
    with trio.fail_after(TIMEOUT):
        async with (
            provider_for(fake.base_url, retry=retry) as provider,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(collect, provider)
            await fake.wait_for_requests(1)
            await fake.requests[0].ended.wait()
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled_at < 1.0  # the backoff is 5 s
    assert len(fake.requests) == 1


# --- through LLMManager --------------------------------------------------------------------------


async def test_llm_manager_streams_the_provider_and_passes_llm_errors(fake: FakeOpenAI) -> None:
    """``LLMManager([provider])``: default is its name; chunks pass through; ``LLMError`` unchanged."""
    fake.script(answer_stream("x", thinking=["hm"]), HttpError(400, "nope"))
    with trio.fail_after(TIMEOUT):
        async with provider_for(fake.base_url, name="remote") as provider:
            manager = LLMManager([provider])
            assert (manager.default, manager.names) == ("remote", ("remote",))
            assert manager.provider() is provider
            async with aclosing(manager.stream(HI, provider="remote")) as stream:
                chunks = [item async for item in stream]
            error = await consume_expecting_error(manager)
    assert chunks == [ReasoningDelta("hm"), TextDelta("x"), Usage(10, 5)]
    assert "'remote'" in str(error)
    assert "HTTP 400" in str(error)
    assert "nope" in str(error)


async def consume_expecting_error(manager: LLMManager) -> LLMError:
    """Iterate ``manager.stream`` to its end, which must be an ``LLMError``."""
    try:
        async with aclosing(manager.stream(HI)) as stream:
            async for _ in stream:
                pass
    except LLMError as exc:
        return exc
    raise AssertionError("manager.stream did not raise LLMError")


# --- an invalid tool call through the runtime ----------------------------------------------------


async def test_invalid_arguments_through_the_runtime(
    fake: FakeOpenAI, make_config: Callable[..., Config]
) -> None:
    """Unparsable arguments: tool_completed error/invalid_arguments, the model is told, the run goes on."""
    fake.script(
        tool_call_stream(("call_bad", "calculator", '{"expression": 2+')),
        answer_stream("Sorry, ", "I sent bad arguments."),
    )
    with trio.fail_after(TIMEOUT):
        async with (
            provider_for(fake.base_url) as provider,
            Runtime(make_config(), llm=provider) as runtime,
        ):
            handle = await runtime.start_run("alice", "what is 2+?")
            events = await handle.collect()
    check_lifecycle([e.frame for e in events])
    types = [e.type for e in events]
    assert types == [
        "agent_started",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "partial_result",
        "agent_completed",
    ]
    completed = events[2].data
    assert (completed["call_id"], completed["tool_name"]) == ("call_bad", "calculator")
    assert completed["status"] == "error"
    assert completed["error"]["type"] == "invalid_arguments"
    assert events[-1].data["final_response"] == "Sorry, I sent bad arguments."
    tool_message = fake.requests[1].messages[-1]
    assert tool_message["role"] == "tool"
    assert tool_message["tool_call_id"] == "call_bad"
    assert "invalid_arguments" in tool_message["content"]


# --- pure helpers --------------------------------------------------------------------------------


def test_tool_call_assembler_joins_fragments_by_index() -> None:
    """Fragments by index; name and arguments concatenated; a missing id becomes ``call_<index>``."""
    assembler = ToolCallAssembler()
    assert not assembler
    assembler.add([{"index": 1, "function": {"name": "sle", "arguments": '{"sec'}}])
    assembler.add([{"index": 0, "id": "call_z", "function": {"name": "calculator"}}])
    assembler.add([{"index": 1, "function": {"name": "ep", "arguments": 'onds": 1}'}}])
    assembler.add([{"index": 0, "function": {"arguments": '{"expression": "1+1"}'}}])
    assert assembler
    assert assembler.calls() == (
        ToolCall("call_z", "calculator", {"expression": "1+1"}),
        ToolCall("call_1", "sleep", {"seconds": 1}),
    )


async def test_parse_sse_chunks_stops_at_done_and_rejects_incomplete_streams() -> None:
    """``[DONE]`` ends the stream (also without a trailing blank line); EOF before it is ``LLMError``."""

    class Lines:
        # Not an async generator: parse_sse_chunks leaves its input unclosed (see the
        # last test), which trio would report for a generator.
        def __init__(self, items: tuple[str, ...]) -> None:
            self._items = iter(items)

        def __aiter__(self) -> Lines:
            return self

        async def __anext__(self) -> str:
            await trio.lowlevel.checkpoint()
            try:
                return next(self._items)
            except StopIteration:
                raise StopAsyncIteration from None

    async def parse(*items: str) -> list[dict[str, Any]]:
        async with aclosing(parse_sse_chunks(Lines(items))) as payloads:  # type: ignore[type-var]
            return [p async for p in payloads]

    assert await parse(": hi", 'data: {"a": 1}', "", "data: [DONE]", "", 'data: {"b": 2}', "") == [
        {"a": 1}
    ]
    assert await parse('data: {"a": 1}', "", "data: [DONE]") == [{"a": 1}]
    with pytest.raises(LLMError, match="ended before"):
        await parse('data: {"a": 1}', "")
    with pytest.raises(LLMError, match="malformed"):
        await parse("data: {", "")


def test_message_to_openai() -> None:
    """Plain messages keep their content; tool-call messages get JSON-string arguments and ``None`` content."""
    assert message_to_openai(ChatMessage("user", "hi")) == {"role": "user", "content": "hi"}
    call = ToolCall("c1", "calculator", {"expression": "1+1", "nested": {"x": [1, math.pi]}})
    out = message_to_openai(ChatMessage("assistant", "", tool_calls=(call,)))
    assert out["content"] is None
    (sent,) = out["tool_calls"]
    assert (sent["id"], sent["type"], sent["function"]["name"]) == ("c1", "function", "calculator")
    assert json.loads(sent["function"]["arguments"]) == call.arguments
    with_text = message_to_openai(ChatMessage("assistant", "Let me see.", tool_calls=(call,)))
    assert with_text["content"] == "Let me see."
    assert message_to_openai(ChatMessage("tool", "2", tool_call_id="c1", name="calculator")) == {
        "role": "tool",
        "content": "2",
        "tool_call_id": "c1",
    }


# --- abandoned async generators ----------------------------------------------------


async def complete_one_stream(fake: FakeOpenAI, provider: OpenAIChatProvider) -> None:
    fake.script(answer_stream("ok"))
    assert texts(await chunks_of(provider)) == ["ok"]


async def fail_on_an_error_event(fake: FakeOpenAI, provider: OpenAIChatProvider) -> None:
    fake.script(Stream([role(), text("a"), {"error": {"message": "model crashed"}}]))
    _, error = await collect(provider)
    assert error is not None


async def close_the_manager_stream_early(fake: FakeOpenAI, provider: OpenAIChatProvider) -> None:
    fake.script(slow_stream())
    async with aclosing(LLMManager([provider]).stream(HI)) as stream:
        async for _ in stream:
            break
    await fake.requests[-1].ended.wait()


@pytest.mark.parametrize(
    "scenario",
    [complete_one_stream, fail_on_an_error_event, close_the_manager_stream_early],
    ids=["completed-stream", "error-event", "manager-stream-closed-early"],
)
async def test_no_async_generator_is_abandoned(
    fake: FakeOpenAI,
    scenario: Callable[[FakeOpenAI, OpenAIChatProvider], Any],
) -> None:
    """No call leaves one of our async generators for trio to finalize from the garbage collector.

    (httpx/httpcore's own nested response iterators are not closed by
    ``Response.aclose()`` when a stream is abandoned; that is theirs, and ignored.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with trio.fail_after(TIMEOUT):
            async with provider_for(fake.base_url) as provider:
                await scenario(fake, provider)
                gc.collect()
    abandoned = [str(w.message).split(" was ")[0] for w in caught]
    ours = [name for name in abandoned if "httpx." not in name and "httpcore." not in name]
    assert ours == []
