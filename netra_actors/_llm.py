"""LLM providers behind one small interface, and the ``LLMManager`` agents call.

A provider streams a chat completion as typed chunks: reasoning text (shown as
``agent_thinking``), answer text (``partial_result``), the tool calls the model
asks for, and token usage. The deterministic ``ScriptedLLMProvider`` is the
default, so the demo and the tests run offline; an OpenAI-compatible HTTP
provider plugs into the same interface.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs
import trio

from ._exceptions import LLMError
from ._messages import ToolCall
from ._telemetry import Telemetry
from ._trace import UnifiedTraceContext


@attrs.frozen
class ChatMessage:
    """One message of a conversation, as the chat-completions API knows it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@attrs.frozen
class ToolSpec:
    """A tool as offered to the model: its name, description and JSON schema of parameters."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@attrs.frozen
class ChatRequest:
    """A request for one assistant turn."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    model: str | None = None
    trace: UnifiedTraceContext | None = None


@attrs.frozen
class ReasoningDelta:
    """A piece of the model's visible reasoning."""

    text: str


@attrs.frozen
class TextDelta:
    """A piece of the answer text."""

    text: str


@attrs.frozen
class ToolCallsReady:
    """The complete tool calls the model asks for in this turn (arguments assembled)."""

    calls: tuple[ToolCall, ...]


@attrs.frozen
class Usage:
    """Token usage of the turn."""

    prompt_tokens: int
    completion_tokens: int


LLMChunk = ReasoningDelta | TextDelta | ToolCallsReady | Usage


class LLMProvider(Protocol):
    """A chat-completions back end.

    ``stream_chat`` yields the chunks of one assistant turn. It is cancelled by
    cancelling the task iterating it; a provider must release its resources
    (an HTTP stream, say) when that happens. Failures raise ``LLMError``.
    """

    name: str

    def stream_chat(self, request: ChatRequest) -> AsyncIterator[LLMChunk]: ...


@attrs.frozen
class ScriptedTurn:
    """What the scripted model says in one turn."""

    reasoning: tuple[str, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    answer: tuple[str, ...] = ()
    error: str | None = None


Script = Callable[[ChatRequest], ScriptedTurn]


class ScriptedLLMProvider:
    """A deterministic model: a function of the conversation decides each turn.

    Chunks are yielded as fast as the runtime takes them. Each chunk is a
    cancellation point (a cancelled run stops at the next chunk), and every
    ``YIELD_EVERY`` chunks the provider lets other tasks run, as a model's
    network stream would: a scheduler pass per chunk would cost more than the
    event the chunk becomes. A turn with ``error`` raises ``LLMError`` after its
    reasoning, as a failing real provider would mid-stream.
    """

    YIELD_EVERY = 8

    def __init__(self, script: Script, *, name: str = "scripted") -> None:
        self.name = name
        self._script = script

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[LLMChunk, None]:
        turn = self._script(request)
        prompt_tokens = sum(map(_words_in, [m.content for m in request.messages]))
        completion_tokens = 0
        every = self.YIELD_EVERY
        chunks = 0
        for text in turn.reasoning:
            chunks = await _pace(chunks, every)
            completion_tokens += len(text.split())
            yield ReasoningDelta(text)
        if turn.error is not None:
            await trio.lowlevel.checkpoint()
            raise LLMError(turn.error)
        for text in turn.answer:
            chunks = await _pace(chunks, every)
            completion_tokens += 1
            yield TextDelta(text)
        if turn.tool_calls:
            await trio.lowlevel.checkpoint()
            yield ToolCallsReady(turn.tool_calls)
        yield Usage(prompt_tokens, completion_tokens)


@functools.lru_cache(maxsize=4096)
def _words_in(text: str) -> int:
    """The scripted model's token count of a message (a thread's history is sent, and
    counted, again with every turn: counted once per message instead)."""
    return len(text.split())


async def _pace(chunks: int, every: int) -> int:
    """A cancellation point; a scheduling point once every ``every`` calls."""
    if chunks % every == 0:
        await trio.lowlevel.checkpoint()
    else:
        await trio.lowlevel.checkpoint_if_cancelled()
    return chunks + 1


class LLMManager:
    """The providers of a runtime, by name, with a default.

    Agents call ``stream`` (or ``complete``) without knowing which back end
    answers. Any exception a provider raises other than ``LLMError`` (and
    cancellation) is wrapped in ``LLMError``, so a provider failure is always
    reported as ``llm_error``.
    """

    def __init__(self, providers: Sequence[LLMProvider] = (), default: str | None = None) -> None:
        self._providers = {p.name: p for p in providers}
        if default is None and providers:
            default = providers[0].name
        if default is not None and default not in self._providers:
            raise ValueError(f"no provider named {default!r}")
        self.default = default
        #: Receives a span per LLM call (set by the runtime).
        self.telemetry = Telemetry()

    def register(self, provider: LLMProvider, *, default: bool = False) -> None:
        """Add a provider (at start-up; the manager is read-only while runs execute)."""
        self._providers[provider.name] = provider
        if default or self.default is None:
            self.default = provider.name

    def provider(self, name: str | None = None) -> LLMProvider:
        """The named provider, or the default. Raises ``LLMError`` if there is none."""
        key = name or self.default
        if key is None or key not in self._providers:
            raise LLMError(f"no LLM provider named {key!r}")
        return self._providers[key]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._providers)

    async def stream(
        self, request: ChatRequest, *, provider: str | None = None
    ) -> AsyncGenerator[LLMChunk, None]:
        """Stream one assistant turn from a provider; see ``LLMProvider.stream_chat``.

        The call is one ``llm`` span of ``request.trace`` (a new trace without
        one), which ends when the turn does: after its last chunk, on a
        failure, or when the consumer stops early or is cancelled (status
        ``cancelled``). A ``Usage`` chunk's tokens become span attributes.
        """
        source = self.provider(provider)
        model = request.model or getattr(source, "model", None) or ""
        trace = request.trace or UnifiedTraceContext.new_root()
        with self.telemetry.span("llm", source.name, trace, {"model": model}) as span:
            chunks = source.stream_chat(request)
            exhausted = False
            try:
                async for chunk in chunks:
                    if isinstance(chunk, Usage):
                        span["prompt_tokens"] = chunk.prompt_tokens
                        span["completion_tokens"] = chunk.completion_tokens
                    yield chunk
                exhausted = True
            except LLMError as exc:
                span["error"] = str(exc)
                raise
            except Exception as exc:
                span["error"] = f"{type(exc).__name__}: {exc}"
                raise LLMError(f"provider {source.name!r} failed: {exc}") from exc
            finally:
                # Close the provider's generator now (and its HTTP stream), not at GC.
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None and not exhausted:
                    with trio.CancelScope(shield=True):
                        await aclose()
