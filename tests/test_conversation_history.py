"""Conversation history: what the model sees of a thread's earlier turns, per user and
per thread; cancelled turns leave no dangling tool calls; the memory store's trimming;
token usage reported with ``agent_completed``.

Virtual time (``autojump_clock``) throughout: no worker threads are involved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from netra_actors import (
    AgentWebSocketBridge,
    ChatMessage,
    ChatRequest,
    Config,
    MemoryConversationStore,
    RunHandle,
    Runtime,
    ScriptedLLMProvider,
    ScriptedTurn,
    ToolCall,
    ToolRegistry,
    tool_calling_agent,
)
from netra_actors._agents import SYSTEM_PROMPT
from netra_actors.testing import check_lifecycle

Frame = dict[str, Any]
BOUND = 600


# --- helpers -------------------------------------------------------------------------------------


def last_user_index(request: ChatRequest) -> int:
    return max(i for i, m in enumerate(request.messages) if m.role == "user")


def this_turn(request: ChatRequest) -> list[ChatMessage]:
    """The messages after the last user message (earlier turns of the thread are history)."""
    return list(request.messages[last_user_index(request) + 1 :])


def user_text(request: ChatRequest) -> str:
    return request.messages[last_user_index(request)].content


def history_of(request: ChatRequest) -> list[ChatMessage]:
    """The messages between the system prompt and the new user message."""
    assert request.messages[0] == ChatMessage("system", SYSTEM_PROMPT)
    return list(request.messages[1 : last_user_index(request)])


def assert_well_formed(messages: Sequence[ChatMessage]) -> None:
    """Every assistant tool call is answered by a tool message, and every tool message
    answers a call of the assistant message before it (what chat APIs require)."""
    open_calls: set[str] = set()
    for message in messages:
        if message.role == "tool":
            assert message.tool_call_id in open_calls, (message, messages)
            open_calls.discard(message.tool_call_id)
            continue
        assert not open_calls, f"unanswered tool calls {open_calls} before {message}"
        if message.role == "assistant" and message.tool_calls:
            open_calls = {c.call_id for c in message.tool_calls}
    assert not open_calls, f"unanswered tool calls {open_calls} at the end"


def frames_of(events: Sequence[Any]) -> list[Frame]:
    return [json.loads(e.frame) for e in events]


async def run_once(
    runtime: Runtime, user: str, text: str, thread_id: str = "main", **kwargs: Any
) -> list[Frame]:
    handle = await runtime.start_run(user, text, thread_id=thread_id, **kwargs)
    frames = frames_of(await handle.collect())
    check_lifecycle(frames)
    return frames


def of_type(frames: Sequence[Frame], kind: str) -> list[Frame]:
    return [f for f in frames if f["type"] == kind]


def _tools() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool()
    async def lookup(query: str, api_key: str) -> dict[str, str]:
        """Look something up with a key."""
        await trio.lowlevel.checkpoint()
        return {"query": query, "answer": "sunny"}

    @registry.tool(timeout=3600)
    async def hang() -> str:
        """Sleep for an hour."""
        await trio.sleep(3600)
        return "never"

    return registry


REAL_ARGS = {"query": "weather", "api_key": "sk-real-secret"}


def _script(seen: list[ChatRequest]) -> Callable[[ChatRequest], ScriptedTurn]:
    """``lookup``: call lookup, then answer; ``hang``: call hang; ``two steps``: lookup
    then hang; anything else: answer ``ok``. Records every request."""

    def script(request: ChatRequest) -> ScriptedTurn:
        seen.append(request)
        text = user_text(request)
        done = [m for m in this_turn(request) if m.role == "tool"]
        if text == "lookup" and not done:
            return ScriptedTurn(tool_calls=(ToolCall("call-look", "lookup", REAL_ARGS),))
        if text == "lookup":
            return ScriptedTurn(answer=("It ", "is ", "sunny."))
        if text == "hang":
            return ScriptedTurn(reasoning=("waiting",), tool_calls=(ToolCall("call-h", "hang"),))
        if text == "two steps" and not done:
            return ScriptedTurn(tool_calls=(ToolCall("call-1", "lookup", REAL_ARGS),))
        if text == "two steps":
            return ScriptedTurn(
                answer=("then ",),
                tool_calls=(ToolCall("call-2", "hang"), ToolCall("call-3", "lookup", REAL_ARGS)),
            )
        return ScriptedTurn(answer=("ok",))

    return script


def make_runtime(config: Config, seen: list[ChatRequest]) -> Runtime:
    return Runtime(
        config,
        agents={"loop": tool_calling_agent(max_steps=4)},
        tools=_tools(),
        llm=ScriptedLLMProvider(_script(seen)),
    )


def request_for(seen: Sequence[ChatRequest], text: str) -> ChatRequest:
    """The first request of the run whose user message is ``text`` (the last such run)."""
    firsts = [r for r in seen if user_text(r) == text and not this_turn(r)]
    assert firsts, text
    return firsts[-1]


async def cancel_at_first(runtime: Runtime, user: str, text: str, thread_id: str) -> list[Frame]:
    """Run ``text``; cancel it when its first tool call starts; its checked frames."""
    handle = await runtime.start_run(user, text, thread_id=thread_id)
    frames: list[Frame] = []
    async for event in handle.events():
        frame = json.loads(event.frame)
        frames.append(frame)
        if frame["type"] == "tool_executing" and frame["data"]["tool_name"] == "hang":
            assert (await handle.cancel()).state == "active"
    check_lifecycle(frames)
    assert frames[-1]["type"] == "agent_cancelled"
    return frames


# --- what the model sees -----------------------------------------------------------------------


async def test_a_threads_second_message_sees_the_first_turn_and_nobody_else_does(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Same thread: the whole first turn (real tool arguments); other thread/user: nothing."""
    seen: list[ChatRequest] = []
    runtime = make_runtime(make_config(), seen)
    with trio.fail_after(BOUND):
        async with runtime:
            first = await run_once(runtime, "alice", "lookup", "t1")
            await run_once(runtime, "alice", "second", "t1")
            await run_once(runtime, "alice", "second", "t2")
            await run_once(runtime, "bob", "second", "t1")

    # The event stream showed the key redacted...
    (executing,) = of_type(first, "tool_executing")
    assert executing["data"]["parameters"] == {"query": "weather", "api_key": "[redacted]"}
    (completed,) = of_type(first, "tool_completed")
    assert first[-1]["data"]["final_response"] == "It is sunny."

    # ...but the model's history has the real arguments.
    same_thread = [r for r in seen if user_text(r) == "second"]
    assert len(same_thread) == 3
    alice_t1, alice_t2, bob_t1 = same_thread
    assert history_of(alice_t1) == [
        ChatMessage("user", "lookup"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call-look", "lookup", REAL_ARGS),)),
        ChatMessage(
            "tool",
            json.dumps(completed["data"]["results"], separators=(",", ":")),
            tool_call_id="call-look",
            name="lookup",
        ),
        ChatMessage("assistant", "It is sunny."),
    ]
    assert alice_t1.messages[-1] == ChatMessage("user", "second")
    assert_well_formed(alice_t1.messages)
    assert history_of(alice_t2) == []
    assert history_of(bob_t1) == []
    # The tools are offered with every request.
    assert [t.name for t in alice_t1.tools] == ["lookup", "hang"]


async def test_history_grows_turn_by_turn(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Three messages in one thread: the third request carries both earlier turns in order."""
    seen: list[ChatRequest] = []
    runtime = make_runtime(make_config(), seen)
    with trio.fail_after(BOUND):
        async with runtime:
            for text in ("one", "two", "three"):
                await run_once(runtime, "alice", text)

    assert history_of(request_for(seen, "three")) == [
        ChatMessage("user", "one"),
        ChatMessage("assistant", "ok"),
        ChatMessage("user", "two"),
        ChatMessage("assistant", "ok"),
    ]


async def test_a_cancelled_turn_is_remembered_without_a_dangling_tool_call(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelled in its tool: the next request has the user message, no unanswered call."""
    seen: list[ChatRequest] = []
    runtime = make_runtime(make_config(), seen)
    with trio.fail_after(BOUND):
        async with runtime:
            await cancel_at_first(runtime, "alice", "hang", "t1")
            await run_once(runtime, "alice", "after", "t1")

    request = request_for(seen, "after")
    assert_well_formed(request.messages)
    assert history_of(request) == [ChatMessage("user", "hang")]


async def test_a_turn_cancelled_in_its_second_step_keeps_the_answered_first_step(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Step one answered, step two cancelled: history keeps step one and drops step two."""
    seen: list[ChatRequest] = []
    runtime = make_runtime(make_config(), seen)
    with trio.fail_after(BOUND):
        async with runtime:
            frames = await cancel_at_first(runtime, "alice", "two steps", "t1")
            await run_once(runtime, "alice", "after", "t1")

    # Both calls of step two were reported (one cancelled), before agent_cancelled.
    statuses = {
        f["data"]["call_id"]: f["data"]["status"] for f in of_type(frames, "tool_completed")
    }
    assert statuses["call-1"] == "ok"
    assert statuses["call-2"] == "cancelled"
    history = history_of(request_for(seen, "after"))
    assert_well_formed(history)
    assert [m.role for m in history] == ["user", "assistant", "tool"]
    assert history[1].tool_calls == (ToolCall("call-1", "lookup", REAL_ARGS),)
    assert history[2].tool_call_id == "call-1"


async def test_an_interrupted_turn_is_seen_by_the_interrupting_run(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """policy=interrupt: the new run's request already has the interrupted user message."""
    seen: list[ChatRequest] = []
    runtime = make_runtime(make_config(), seen)
    first: list[Frame] = []
    in_tool = trio.Event()

    async def read_first(handle: RunHandle) -> None:
        async for event in handle.events():
            first.append(json.loads(event.frame))
            if event.type == "tool_executing":
                in_tool.set()

    with trio.fail_after(BOUND):
        async with runtime, trio.open_nursery() as nursery:
            nursery.start_soon(read_first, await runtime.start_run("alice", "hang", thread_id="t1"))
            await in_tool.wait()
            second = await run_once(runtime, "alice", "instead", "t1", policy="interrupt")

    check_lifecycle(sorted(first + second, key=lambda f: f["seq"]))
    assert first[-1]["type"] == "agent_cancelled"
    assert first[-1]["data"]["reason"] == "interrupted"
    assert first[-1]["seq"] < second[0]["seq"]
    assert second[-1]["type"] == "agent_completed"
    request = request_for(seen, "instead")
    assert_well_formed(request.messages)
    assert history_of(request) == [ChatMessage("user", "hang")]


async def test_a_failed_turn_is_remembered_too(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A run ending in step_limit still adds its (complete) exchanges to the history."""
    seen: list[ChatRequest] = []

    def script(request: ChatRequest) -> ScriptedTurn:
        seen.append(request)
        if user_text(request) == "loop":
            n = len([m for m in this_turn(request) if m.role == "tool"])
            return ScriptedTurn(tool_calls=(ToolCall(f"c{n}", "lookup", REAL_ARGS),))
        return ScriptedTurn(answer=("ok",))

    runtime = Runtime(
        make_config(),
        agents={"loop": tool_calling_agent(max_steps=2)},
        tools=_tools(),
        llm=ScriptedLLMProvider(script),
    )
    with trio.fail_after(BOUND):
        async with runtime:
            failed = await run_once(runtime, "alice", "loop")
            await run_once(runtime, "alice", "next")

    assert failed[-1]["data"]["error"]["type"] == "step_limit"
    history = history_of(request_for(seen, "next"))
    assert_well_formed(history)
    assert [m.role for m in history] == ["user", "assistant", "tool", "assistant", "tool"]


# --- MemoryConversationStore --------------------------------------------------------------------


def _exchange(n: int, calls: int = 1) -> list[ChatMessage]:
    """One turn: user, assistant asking ``calls`` tools, their results, the answer."""
    ids = tuple(ToolCall(f"c{n}-{i}", "t") for i in range(calls))
    return [
        ChatMessage("user", f"u{n}"),
        ChatMessage("assistant", "", tool_calls=ids),
        *(ChatMessage("tool", "{}", tool_call_id=c.call_id, name="t") for c in ids),
        ChatMessage("assistant", f"a{n}"),
    ]


async def test_memory_store_keeps_threads_apart_and_in_order() -> None:
    """load returns copies of each (user, thread) history, oldest first."""
    store = MemoryConversationStore()
    assert await store.load("alice", "t1") == []
    await store.append("alice", "t1", _exchange(1))
    await store.append("alice", "t1", _exchange(2))
    await store.append("alice", "t2", _exchange(3))
    await store.append("bob", "t1", _exchange(4))
    assert await store.load("alice", "t1") == _exchange(1) + _exchange(2)
    assert await store.load("alice", "t2") == _exchange(3)
    assert await store.load("bob", "t1") == _exchange(4)
    loaded = await store.load("alice", "t1")
    loaded.clear()
    assert len(await store.load("alice", "t1")) == 8


@pytest.mark.parametrize(
    ("max_messages", "expected_first"),
    [
        (8, ChatMessage("user", "u1")),
        (7, ChatMessage("assistant", "", tool_calls=(ToolCall("c1-0", "t"),))),
        # 6 would start with c1-0's tool message: it is dropped too.
        (6, ChatMessage("assistant", "a1")),
        (5, ChatMessage("assistant", "a1")),
        (4, ChatMessage("user", "u2")),
    ],
)
async def test_memory_store_trims_to_max_messages_never_starting_with_a_tool_message(
    max_messages: int, expected_first: ChatMessage
) -> None:
    """The oldest messages fall out; a leading tool message (call gone) falls out too."""
    store = MemoryConversationStore(max_messages=max_messages)
    await store.append("alice", "t", _exchange(1))
    await store.append("alice", "t", _exchange(2))
    history = await store.load("alice", "t")
    assert len(history) <= max_messages
    assert history[0] == expected_first
    assert history[-4:] == _exchange(2)


@given(
    st.integers(min_value=1, max_value=12),
    st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=8),
)
def test_memory_store_trimming_property(max_messages: int, turns: list[int]) -> None:
    """Any turns: at most max_messages, the newest, no leading or orphaned tool message."""

    async def main() -> list[ChatMessage]:
        store = MemoryConversationStore(max_messages=max_messages)
        for n, calls in enumerate(turns):
            await store.append("u", "t", _exchange(n, calls))
        return await store.load("u", "t")

    history = trio.run(main)
    everything = [m for n, calls in enumerate(turns) for m in _exchange(n, calls)]
    assert len(history) <= max_messages
    assert history == everything[len(everything) - len(history) :]  # a suffix
    assert not history or history[0].role != "tool"
    # Tool messages are only ever kept together with the call that asked for them.
    seen_calls: set[str] = set()
    for message in history:
        seen_calls.update(c.call_id for c in message.tool_calls)
        if message.role == "tool":
            assert message.tool_call_id in seen_calls
    # Nothing was dropped beyond what the limit (and the leading-tool rule) requires.
    cut = len(everything) - max_messages
    if cut <= 0:
        assert history == everything
    else:
        skipped = everything[cut : len(everything) - len(history)]
        assert all(m.role == "tool" for m in skipped)


# --- usage ----------------------------------------------------------------------------------------


def _words(text: str) -> int:
    return len(text.split())


async def test_usage_is_summed_over_the_runs_llm_calls(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """agent_completed.usage = the sum of each LLM call's prompt and completion word counts."""
    calls: list[tuple[ChatRequest, ScriptedTurn]] = []

    def script(request: ChatRequest) -> ScriptedTurn:
        step = len([m for m in this_turn(request) if m.role == "tool"])
        if step < 2:
            turn = ScriptedTurn(
                reasoning=("Let me look that up", f"now step {step}"),
                answer=("Looking",) if step else (),
                tool_calls=(ToolCall(f"c{step}", "lookup", REAL_ARGS),),
            )
        else:
            turn = ScriptedTurn(reasoning=("Done.",), answer=("It ", "is ", "sunny ", "today."))
        calls.append((request, turn))
        return turn

    def expected(pairs: Sequence[tuple[ChatRequest, ScriptedTurn]]) -> dict[str, int]:
        prompt = sum(_words(m.content) for request, _ in pairs for m in request.messages)
        completion = sum(
            sum(_words(r) for r in turn.reasoning) + len(turn.answer) for _, turn in pairs
        )
        return {"prompt_tokens": prompt, "completion_tokens": completion}

    runtime = Runtime(
        make_config(),
        agents={"loop": tool_calling_agent(max_steps=4)},
        tools=_tools(),
        llm=ScriptedLLMProvider(script),
    )
    with trio.fail_after(BOUND):
        async with runtime:
            first = await run_once(runtime, "alice", "what is the weather")
            first_calls = list(calls)
            calls.clear()
            second = await run_once(runtime, "alice", "and tomorrow")
            second_calls = list(calls)

    assert len(first_calls) == len(second_calls) == 3
    usage = first[-1]["data"]["usage"]
    assert usage == expected(first_calls)
    # Hand check of the completion side: (5 + 3) + (5 + 3 + 1) + (1 + 4) words/chunks.
    assert usage["completion_tokens"] == 22
    assert usage["prompt_tokens"] > 0
    # The second run counts only its own calls (whose prompts include the history).
    second_usage = second[-1]["data"]["usage"]
    assert second_usage == expected(second_calls)
    assert second_usage["completion_tokens"] == 22
    assert second_usage["prompt_tokens"] > usage["prompt_tokens"]


async def test_no_usage_key_without_llm_calls(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """An agent that never calls the model reports no usage."""

    async def plain(bridge: AgentWebSocketBridge) -> str:
        await bridge.partial("hi")
        return "hi"

    runtime = Runtime(make_config(), agents={"plain": plain}, tools=_tools())
    with trio.fail_after(BOUND):
        async with runtime:
            run = await run_once(runtime, "alice", "hello")

    assert run[-1]["type"] == "agent_completed"
    assert "usage" not in run[-1]["data"]
