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

import trio

from ._llm import LLMManager, ToolSpec
from ._messages import (
    CancelToolCall,
    EmitEvent,
    ExecuteTool,
    StartRun,
    ToolCall,
    ToolInbox,
    ToolResult,
)
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
        emit: trio.MemorySendChannel[EmitEvent],
        tools: trio.MemorySendChannel[ToolInbox],
        llm: LLMManager,
        tool_specs: Sequence[ToolSpec],
        tool_reply_backstop: float = TOOL_REPLY_BACKSTOP,
    ) -> None:
        self.request = request
        self.llm = llm
        self.tool_specs = tuple(tool_specs)
        self._emit = emit
        self._tools = tools
        self._step = 0
        self._backstop = tool_reply_backstop

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
        call = ToolCall(call_id or new_call_id(), name, dict(arguments or {}))
        reply_send, reply_recv = trio.open_memory_channel[ToolResult](1)
        async with reply_recv:
            await self._tools.send(
                ExecuteTool(self.run_id, self.thread_id, call, self.request.trace, reply_send)
            )
            try:
                return await reply_recv.receive()
            except trio.Cancelled:
                with trio.CancelScope(shield=True) as grace:
                    grace.deadline = trio.current_time() + self._backstop
                    try:
                        await self._tools.send(CancelToolCall(self.run_id, call.call_id))
                        await reply_recv.receive()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
                        pass  # the executor is gone: the session is being torn down
                raise

    async def execute_tools(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run several tool calls in parallel; results in the order of ``calls``."""
        results: list[ToolResult | None] = [None] * len(calls)

        async def one(index: int, call: ToolCall) -> None:
            results[index] = await self.execute_tool(
                call.name, call.arguments, call_id=call.call_id
            )

        async with trio.open_nursery() as nursery:
            for index, call in enumerate(calls):
                nursery.start_soon(one, index, call)
        return [r for r in results if r is not None]


class WebSocketNotifier(AgentWebSocketBridge):
    """Deprecated: use ``AgentWebSocketBridge``. Kept so old agent code keeps importing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "WebSocketNotifier is deprecated; use AgentWebSocketBridge",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
