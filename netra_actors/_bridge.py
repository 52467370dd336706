"""``AgentWebSocketBridge``: what agent code emits through and calls tools with.

One bridge per run. Agent code never touches a channel, a connection or a
sequence number: it reports thinking and partial answers, asks for tool calls,
and returns its final answer; the runtime turns that into the run's events.
The lifecycle events (``agent_started`` and the terminal event) are not the
agent's to send: the runtime emits them around the agent, so they hold even
when the agent crashes or is cancelled.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from ._conversations import ConversationStore
from ._llm import ChatMessage, LLMManager, ToolSpec
from ._messages import (
    CancelToolCall,
    EmitEvent,
    ExecuteTool,
    StartRun,
    ToolCall,
    ToolInbox,
    ToolResult,
)
from ._sequencer import Emitter
from ._trace import UnifiedTraceContext

#: Backstop for a run waiting on its cancelled tool. The executor answers within
#: its ``tool_cancel_grace``; this only matters if the executor itself is gone.
TOOL_REPLY_BACKSTOP = 11.0


def new_call_id() -> str:
    """A fresh tool call id."""
    return "call_" + uuid.uuid4().hex[:16]


class AgentWebSocketBridge:
    """The run-scoped handle an agent function receives.

    Every ``async`` method is a checkpoint: when the run is cancelled it raises
    ``trio.Cancelled``, which the agent should let propagate.
    """

    def __init__(
        self,
        request: StartRun,
        *,
        emit: Emitter,
        tools: trio.MemorySendChannel[ToolInbox],
        llm: LLMManager,
        tool_specs: Sequence[ToolSpec],
        tool_reply_backstop: float = TOOL_REPLY_BACKSTOP,
        conversations: ConversationStore | None = None,
    ) -> None:
        self.request = request
        self.llm = llm
        self.tool_specs = tuple(tool_specs)
        self._emit = emit
        self._tools = tools
        self._step = 0
        self._backstop = tool_reply_backstop
        self._conversations = conversations
        self._call_ids: set[str] = set()  # every call id of this run
        self._unexecuted: set[str] = set()  # made unique by unique_calls, not yet run
        #: Token usage of this run's LLM calls (see ``record_usage``).
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        #: When the run last showed progress: an event sent, a tool result back (trio time).
        self.last_progress = trio.current_time()

    # -- what the run is -----------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.request.run_id

    @property
    def user_id(self) -> str:
        return self.request.user_id

    @property
    def thread_id(self) -> str:
        return self.request.thread_id

    @property
    def text(self) -> str:
        """The user's message that started the run."""
        return self.request.text

    @property
    def trace(self) -> UnifiedTraceContext:
        return self.request.trace

    # -- events ----------------------------------------------------------------------------

    async def _send(self, event_type: str, data: Mapping[str, Any]) -> None:
        self.last_progress = trio.current_time()
        await self._emit.send(
            EmitEvent(
                event_type, self.request.run_id, self.request.thread_id, self.request.trace, data
            )
        )

    async def thinking(self, reasoning: str, step: int | None = None) -> None:
        """Emit ``agent_thinking``. ``step`` defaults to the current tool-calling step.

        Raises:
            TypeError: ``reasoning`` is not a string (the run ends ``agent_error``).
        """
        if not isinstance(reasoning, str):
            raise TypeError(f"reasoning must be a str, not {type(reasoning).__name__}")
        await self._send(
            "agent_thinking", {"reasoning": reasoning, "step": self._step if step is None else step}
        )

    async def partial(self, text: str) -> None:
        """Emit ``partial_result``: a piece of the streamed answer.

        Raises:
            TypeError: ``text`` is not a string (the run ends ``agent_error``).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        await self._send("partial_result", {"text": text})

    def next_step(self) -> int:
        """Advance the step counter reported with ``agent_thinking``; returns the new step."""
        self._step += 1
        return self._step

    # -- tools -----------------------------------------------------------------------------

    async def execute_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, call_id: str | None = None
    ) -> ToolResult:
        """Run one tool in the session's tool executor and wait for its outcome.

        The executor emits ``tool_executing`` and ``tool_completed``. A tool's
        failure is returned as a result with status ``error`` (it does not
        raise): the agent decides what to do next.

        On cancellation the call is cancelled too, and this waits (shielded) for
        its ``tool_completed`` with status ``cancelled`` to be emitted before
        re-raising, so the run's terminal event always comes after it. A tool
        that does not stop within ``tool_cancel_grace`` seconds is abandoned by
        the executor: reported ``cancelled`` at once, its late outcome dropped.
        """
        call = self._take(ToolCall(call_id or new_call_id(), name, dict(arguments or {})))
        return await self._result(call, await self._submit(call))

    def unique_calls(self, calls: Sequence[ToolCall]) -> tuple[ToolCall, ...]:
        """``calls`` with ids made unique within this run (models reuse ids such as
        ``call_0`` across turns, or even within one). Use the returned calls both to
        execute and to record the assistant's turn, so results still match."""
        return tuple(self._claim(call) for call in calls)

    def _take(self, call: ToolCall) -> ToolCall:
        """The call to execute: as given if ``unique_calls`` just made it, else claimed now."""
        if call.call_id in self._unexecuted:
            self._unexecuted.discard(call.call_id)
            return call
        call = self._claim(call)
        self._unexecuted.discard(call.call_id)
        return call

    def _claim(self, call: ToolCall) -> ToolCall:
        call_id = call.call_id
        if call_id in self._call_ids:
            n = 2
            while f"{call.call_id}_{n}" in self._call_ids:
                n += 1
            call_id = f"{call.call_id}_{n}"
            call = attrs.evolve(call, call_id=call_id)
        self._call_ids.add(call_id)
        self._unexecuted.add(call_id)
        return call

    async def execute_tools(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run several tool calls in parallel; results in the order of ``calls``.

        The calls are submitted in order, so their ``tool_executing`` events
        come in that order; their ``tool_completed`` events come as they finish.
        Cancellation is handled per call as in ``execute_tool``.
        """
        submitted: list[tuple[ToolCall, trio.MemoryReceiveChannel[ToolResult]]] = []
        try:
            for call in calls:
                call = self._take(call)
                submitted.append((call, await self._submit(call)))
        except BaseException:
            for call, reply in submitted:
                await self._cancel_and_wait(call, reply)
            raise
        if len(submitted) == 1:
            # The usual case: no nursery and no task for one call.
            return [await self._result(*submitted[0])]
        results: list[ToolResult | None] = [None] * len(submitted)

        async def one(
            index: int, call: ToolCall, reply: trio.MemoryReceiveChannel[ToolResult]
        ) -> None:
            results[index] = await self._result(call, reply)

        async with trio.open_nursery() as nursery:
            for index, (call, reply) in enumerate(submitted):
                nursery.start_soon(one, index, call, reply)
        return [r for r in results if r is not None]

    async def _submit(self, call: ToolCall) -> trio.MemoryReceiveChannel[ToolResult]:
        reply_send, reply_recv = trio.open_memory_channel[ToolResult](1)
        await self._tools.send(
            ExecuteTool(self.run_id, self.thread_id, call, self.request.trace, reply_send)
        )
        return reply_recv

    async def _result(
        self, call: ToolCall, reply: trio.MemoryReceiveChannel[ToolResult]
    ) -> ToolResult:
        try:
            result = await reply.receive()
            self.last_progress = trio.current_time()
            return result
        except trio.Cancelled:
            await self._cancel_and_wait(call, reply)
            raise

    async def _cancel_and_wait(
        self, call: ToolCall, reply: trio.MemoryReceiveChannel[ToolResult]
    ) -> None:
        with trio.CancelScope(shield=True) as grace:
            grace.deadline = trio.current_time() + self._backstop
            try:
                await self._tools.send(CancelToolCall(self.run_id, call.call_id))
                await reply.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
                pass  # the executor is gone: the session is being torn down

    # -- conversation and usage ------------------------------------------------------------

    async def history(self) -> list[ChatMessage]:
        """This thread's earlier turns (empty without a conversation store)."""
        if self._conversations is None:
            await trio.lowlevel.checkpoint()
            return []
        return await self._conversations.load(self.user_id, self.thread_id)

    async def remember(self, messages: Sequence[ChatMessage]) -> None:
        """Add this run's turn to the thread's history (shielded: it completes on cancel)."""
        if self._conversations is None or not messages:
            return
        with trio.CancelScope(shield=True) as shield:
            shield.deadline = trio.current_time() + 5
            await self._conversations.append(self.user_id, self.thread_id, messages)

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Add an LLM call's token usage; reported with ``agent_completed``."""
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens


class WebSocketNotifier(AgentWebSocketBridge):
    """Deprecated: use ``AgentWebSocketBridge``. Kept so old agent code keeps importing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "WebSocketNotifier is deprecated; use AgentWebSocketBridge",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
