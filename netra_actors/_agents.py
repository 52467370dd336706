"""Agents: the general tool-calling loop, and the offline demo built on it.

An agent is an async function ``agent(bridge) -> str`` registered on the
runtime by name. It returns the final answer; the runtime emits
``agent_completed`` with it (or ``agent_error`` / ``agent_cancelled``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from contextlib import aclosing

import orjson
import trio

from ._bridge import AgentWebSocketBridge, new_call_id
from ._calc import calculate
from ._exceptions import StepLimitExceeded, ToolError
from ._llm import (
    ChatMessage,
    ChatRequest,
    ReasoningDelta,
    ScriptedLLMProvider,
    ScriptedTurn,
    TextDelta,
    ToolCallsReady,
    Usage,
)
from ._messages import ToolCall, ToolResult
from ._tools import ToolRegistry

Agent = Callable[[AgentWebSocketBridge], Awaitable[str]]

DEFAULT_MAX_STEPS = 8
SYSTEM_PROMPT = "You are a helpful assistant. Use the tools when they help."


def _tool_message(result: ToolResult) -> ChatMessage:
    if result.ok:
        content = orjson.dumps(result.results).decode()
    else:
        assert result.error is not None
        content = orjson.dumps({"status": result.status, "error": result.error.to_wire()}).decode()
    return ChatMessage("tool", content, tool_call_id=result.call_id, name=result.tool_name)


def tool_calling_agent(
    max_steps: int = DEFAULT_MAX_STEPS,
    provider: str | None = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> Agent:
    """The general loop: the LLM proposes tool calls, the executor runs them, results go back.

    Each step sends the thread's history, the new message and the tool schemas
    to the LLM, streams its reasoning as ``agent_thinking`` and its answer text
    as ``partial_result``; several tool calls in one turn run in parallel. The
    loop ends when the model answers without asking for tools, or raises
    ``StepLimitExceeded`` after ``max_steps`` turns. The turn (the user's
    message, tool calls with their real arguments and results, the answer) is
    added to the thread's history whatever the outcome, so the next message of
    the thread sees it. Token usage is recorded on the bridge.
    """

    async def agent(bridge: AgentWebSocketBridge) -> str:
        history = await bridge.history()
        turn: list[ChatMessage] = [ChatMessage("user", bridge.text)]
        try:
            for step in range(max_steps):
                answer: list[str] = []
                calls: tuple[ToolCall, ...] = ()
                request = ChatRequest(
                    (ChatMessage("system", system_prompt), *history, *turn),
                    bridge.tool_specs,
                    trace=bridge.trace.child(),
                )
                async with aclosing(bridge.llm.stream(request, provider=provider)) as chunks:
                    async for chunk in chunks:
                        match chunk:
                            case ReasoningDelta(text=text):
                                await bridge.thinking(text, step)
                            case TextDelta(text=text):
                                answer.append(text)
                                await bridge.partial(text)
                            case ToolCallsReady(calls=ready):
                                calls = ready
                            case Usage(prompt_tokens=prompt, completion_tokens=completion):
                                bridge.record_usage(prompt, completion)
                if not calls:
                    final = "".join(answer)
                    turn.append(ChatMessage("assistant", final))
                    return final
                bridge.next_step()
                calls = bridge.unique_calls(calls)
                turn.append(ChatMessage("assistant", "".join(answer), tool_calls=calls))
                results = await bridge.execute_tools(calls)
                turn.extend(_tool_message(r) for r in results)
            raise StepLimitExceeded(f"no answer after {max_steps} tool-calling steps")
        finally:
            await bridge.remember(_complete_exchanges(turn))

    return agent


def _complete_exchanges(turn: list[ChatMessage]) -> list[ChatMessage]:
    """``turn`` without a trailing assistant tool request whose results are missing.

    (A run cancelled during its tools; chat APIs refuse a history with
    unanswered tool calls.)
    """
    answered = {m.tool_call_id for m in turn if m.role == "tool"}
    kept: list[ChatMessage] = []
    for message in turn:
        if message.tool_calls and not all(c.call_id in answered for c in message.tool_calls):
            break
        kept.append(message)
    return kept


# --- the demo -----------------------------------------------------------------------------

_WHAT_IS = re.compile(r"^\s*(?:what\s+is|what's|calc(?:ulate)?|compute)\s+(.+?)\s*\??\s*$", re.I)
_SLEEP = re.compile(r"^\s*sleep\s+(\d+(?:\.\d+)?)\s*$", re.I)
_STREAM = re.compile(r"^\s*stream\s+(\d+)\s*$", re.I)
MAX_STREAM = 1_000_000

DEMO_HELP = (
    "Try: 'what is 2+3*4?' (calculator tool), 'sleep 30' (a long tool you can cancel), "
    "'fail' (a failing tool), 'stream N' (N streamed answer pieces), "
    "'crash' (agent code raises), 'llm fail' (the model fails)."
)


def _words(text: str) -> tuple[str, ...]:
    parts = text.split(" ")
    return (*(p + " " for p in parts[:-1]), parts[-1])


def demo_script(request: ChatRequest) -> ScriptedTurn:
    """The scripted model behind the demo agent: a pure function of the conversation."""
    messages = request.messages
    # The newest user message: searched from the end (a thread's history can be long).
    last_user = next(i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user")
    user = request.messages[last_user].content
    # Only this turn's tool results count (earlier turns of the thread are history).
    tool_results = [m for m in request.messages[last_user:] if m.role == "tool"]
    text = user.strip()
    if m := _WHAT_IS.match(text):
        expression = m.group(1)
        if not tool_results:
            return ScriptedTurn(
                reasoning=(
                    "The user asks for an arithmetic result. ",
                    f"I will use the calculator on {expression!r}.",
                ),
                tool_calls=(ToolCall(new_call_id(), "calculator", {"expression": expression}),),
            )
        outcome = orjson.loads(tool_results[-1].content)
        if isinstance(outcome, dict) and "error" in outcome:
            answer = f"I could not compute {expression}: {outcome['error']['message']}"
        else:
            answer = f"{expression} = {outcome}"
        return ScriptedTurn(reasoning=("The calculator answered.",), answer=_words(answer))
    if m := _SLEEP.match(text):
        seconds = float(m.group(1))
        if not tool_results:
            return ScriptedTurn(
                reasoning=(f"I will sleep for {seconds:g} seconds.",),
                tool_calls=(ToolCall(new_call_id(), "sleep", {"seconds": seconds}),),
            )
        return ScriptedTurn(answer=_words(f"I slept for {seconds:g} seconds."))
    if text.lower() == "fail":
        if not tool_results:
            return ScriptedTurn(
                reasoning=("I will call the tool that fails.",),
                tool_calls=(ToolCall(new_call_id(), "fail", {"message": "failure on request"}),),
            )
        return ScriptedTurn(answer=_words("The tool failed, as you asked; I carried on."))
    if m := _STREAM.match(text):
        count = min(int(m.group(1)), MAX_STREAM)
        return ScriptedTurn(
            reasoning=(f"Streaming {count} pieces.",),
            answer=tuple(f"t{i} " for i in range(count)),
        )
    if text.lower() == "llm fail":
        return ScriptedTurn(
            reasoning=("Calling the model...",), error="the scripted model failed on request"
        )
    return ScriptedTurn(
        reasoning=("A plain message; no tool needed.",),
        answer=_words(f"You said: {text[:200]}. {DEMO_HELP}"),
    )


def demo_tools() -> ToolRegistry:
    """The demo's three tools: ``calculator``, ``sleep`` and ``fail``."""
    registry = ToolRegistry()

    @registry.tool()
    async def calculator(expression: str) -> int | float:
        """Evaluate an arithmetic expression (+ - * / // % ** and parentheses)."""
        await trio.lowlevel.checkpoint()
        try:
            return calculate(expression)
        except ValueError as exc:
            raise ToolError(str(exc)) from None

    @registry.tool(timeout=3600)
    async def sleep(seconds: float) -> dict[str, float]:
        """Wait for the given number of seconds (cancellable)."""
        await trio.sleep(seconds)
        return {"slept": seconds}

    @registry.tool()
    async def fail(message: str = "failure on request") -> None:
        """Always fails, so error handling can be seen."""
        await trio.lowlevel.checkpoint()
        raise ToolError(message)

    return registry


def demo_llm() -> ScriptedLLMProvider:
    """The deterministic scripted model of the demo."""
    return ScriptedLLMProvider(demo_script, name="scripted")


def demo_agent(max_steps: int = DEFAULT_MAX_STEPS) -> Agent:
    """The demo agent: the tool-calling loop, plus ``crash`` to show agent failure."""
    loop = tool_calling_agent(max_steps)

    async def agent(bridge: AgentWebSocketBridge) -> str:
        if bridge.text.strip().lower() == "crash":
            await bridge.thinking("About to crash on request.")
            raise RuntimeError("the demo agent crashed on request")
        return await loop(bridge)

    return agent
