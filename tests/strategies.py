"""Shared helpers for the in-process tests: a memory-transport chat client, scripted agents,
and the hypothesis strategies that draw agent scripts.

Nothing here opens a socket or reads the real clock: every helper works under
trio's virtual time (``autojump_clock`` or ``MockClock(autojump_threshold=0)``).

An *agent script* is what a drawn scripted model says, turn by turn: reasoning
chunks (``agent_thinking``), tool calls that succeed, fail or hang (alone or
several in parallel), and a final streamed answer (``partial_result``). From a
script we build the runtime parts (``ScriptedLLMProvider`` + tools + the
``tool_calling_agent``) and the events the run must produce, so a test can
compare what arrived with what the script asked for.

Scripts may also carry *faults*: tools that raise or time out (per-tool timeouts
in virtual time), a model that fails mid-turn (``agent_error`` ``llm_error``) and
an agent that crashes at a drawn step (``agent_error`` ``agent_error``).

For the session-level properties: ``Tab`` (a connection that may read slowly,
be dropped and resume), ``RecordingStore`` (every stamped event and the virtual
time it was stamped: the server's side of the stream), client behaviour and
multi-user ``Scenario`` strategies, and ``SessionModel``, a reference model of
one session (thread policies, queues, cancels, connections, idle teardown).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import attrs
import trio
from hypothesis import strategies as st

from netra_actors import (
    AgentWebSocketBridge,
    ChatRequest,
    Event,
    Runtime,
    ScriptedLLMProvider,
    ScriptedTurn,
    ToolCall,
    ToolError,
    ToolRegistry,
    TransportClosed,
    memory_transport_pair,
    tool_calling_agent,
)
from netra_actors.testing import TERMINAL_EVENTS, check_lifecycle

Frame = dict[str, Any]

# --- frames ------------------------------------------------------------------------------------


def is_event(frame: Mapping[str, Any]) -> bool:
    """A frame of the session's event stream (it carries ``seq``)."""
    return "seq" in frame


def is_terminal(frame: Mapping[str, Any], run_id: str | None = None) -> bool:
    """The terminal event of ``run_id`` (of any run when ``run_id`` is None)."""
    return (
        is_event(frame)
        and frame["type"] in TERMINAL_EVENTS
        and (run_id is None or frame["run_id"] == run_id)
    )


def decode_events(events: Iterable[Any]) -> list[Frame]:
    """``Event`` objects from a ``RunHandle`` as the frames a client would have received."""
    return [json.loads(event.frame) for event in events]


def types_of(frames: Iterable[Mapping[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


def of_type(frames: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [f for f in frames if f.get("type") == kind]


# --- a chat client over an in-memory transport -------------------------------------------------


class MemoryClient:
    """One chat client: its ``read_forever`` task stores every frame the server sends.

    Waiting helpers look through what has arrived and sleep until the next frame,
    so a test never polls and never touches the real clock.
    """

    def __init__(self, transport: Any, user_id: str) -> None:
        self.transport = transport
        self.user_id = user_id
        self.frames: list[Frame] = []
        #: Virtual time at which each frame of ``frames`` arrived.
        self.times: list[float] = []
        self.close_code: int | None = None
        self.closed = trio.Event()
        self._arrived = trio.Event()

    async def read_forever(self) -> None:
        try:
            while True:
                raw = await self.transport.receive()
                assert isinstance(raw, str), f"the server sent a binary frame: {raw!r}"
                self.frames.append(json.loads(raw))
                self.times.append(trio.current_time())
                self._arrived.set()
                self._arrived = trio.Event()
        except TransportClosed as exc:
            self.close_code = exc.code
        finally:
            self.closed.set()
            self._arrived.set()

    async def send(self, **frame: Any) -> None:
        await self.transport.send_text(json.dumps(frame))

    async def send_raw(self, message: str | bytes) -> None:
        await self.transport.send_message(message)

    async def wait_for(self, predicate: Callable[[Frame], bool], *, start: int = 0) -> Frame:
        """The first frame from index ``start`` on that matches, waiting for it if needed."""
        index = start
        while True:
            while index < len(self.frames):
                if predicate(self.frames[index]):
                    return self.frames[index]
                index += 1
            if self.closed.is_set():
                raise AssertionError(
                    f"connection closed ({self.close_code}) before the awaited frame arrived"
                )
            await self._arrived.wait()

    async def user_message(self, text: str, **fields: Any) -> str:
        """Send a ``user_message``; return the ``run_id`` of its ``run_accepted``."""
        start = len(self.frames)
        await self.send(type="user_message", text=text, **fields)
        accepted = await self.wait_for(
            lambda f: f["type"] in ("run_accepted", "error"), start=start
        )
        assert accepted["type"] == "run_accepted", accepted
        if "client_msg_id" in fields:
            assert accepted["client_msg_id"] == fields["client_msg_id"]
        return str(accepted["run_id"])

    async def wait_terminal(self, run_id: str) -> Frame:
        return await self.wait_for(lambda f: is_terminal(f, run_id))

    async def wait_event(self, run_id: str, kind: str | None = None, count: int = 1) -> Frame:
        """Wait until ``count`` events of ``run_id`` (of type ``kind``, if given) have arrived.

        Returns the ``count``-th one.
        """
        seen: list[Frame] = []

        def match(frame: Frame) -> bool:
            if is_event(frame) and frame["run_id"] == run_id and kind in (None, frame["type"]):
                seen.append(frame)
            return len(seen) >= count

        return await self.wait_for(match)

    @property
    def session_ready(self) -> Frame:
        assert self.frames, "no frame yet"
        assert self.frames[0]["type"] == "session_ready", self.frames[0]
        return self.frames[0]

    @property
    def events(self) -> list[Frame]:
        return [f for f in self.frames if is_event(f)]

    def run_events(self, run_id: str) -> list[Frame]:
        return [f for f in self.events if f["run_id"] == run_id]

    def run_event_times(self, run_id: str) -> list[float]:
        """When each of ``run_events(run_id)`` arrived (virtual time)."""
        return [
            t
            for f, t in zip(self.frames, self.times, strict=True)
            if is_event(f) and f["run_id"] == run_id
        ]

    def replies(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if not is_event(f) and f["type"] == kind]

    async def close(self, code: int = 1000) -> None:
        await self.transport.close(code)


async def connect(nursery: trio.Nursery, runtime: Runtime, user_id: str) -> MemoryClient:
    """Open a connection for ``user_id`` and wait for its ``session_ready``."""
    server_end, client_end = memory_transport_pair()
    client = MemoryClient(client_end, user_id)
    nursery.start_soon(runtime.serve_connection, user_id, server_end)
    nursery.start_soon(client.read_forever)
    await client.wait_for(lambda f: True)
    ready = client.session_ready
    assert ready["user_id"] == user_id
    assert ready["protocol"] == 1
    return client


# --- agent scripts -----------------------------------------------------------------------------

#: What a scripted tool call does: ``ok`` returns at once, ``fail`` raises ``ToolError``,
#: ``raise`` raises a plain exception, ``slow`` returns after ``SLOW_SECONDS`` (within its
#: timeout), ``late`` would return after ``LATE_SECONDS`` but times out first, ``hang``
#: never returns (times out after ``HANG_TIMEOUT``).
ToolKind = Literal["ok", "fail", "hang", "raise", "slow", "late"]

#: Virtual seconds a ``hang_tool`` call may run before it ends with status ``timeout``.
HANG_TIMEOUT = 5.0
#: The timeout of ``slow_tool`` and ``late_tool`` (virtual seconds).
TIMED_TIMEOUT = 3.0
#: How long ``slow_tool`` takes (under its timeout) and ``late_tool`` would take (over it).
SLOW_SECONDS = 1.5
LATE_SECONDS = 4.5

#: ``tool_completed.data.status`` each kind of call ends with when nothing cancels it.
EXPECTED_STATUS: Mapping[ToolKind, str] = {
    "ok": "ok",
    "fail": "error",
    "hang": "timeout",
    "raise": "error",
    "slow": "ok",
    "late": "timeout",
}

#: ``tool_completed.data.error.type`` when the status is not ``ok``.
EXPECTED_ERROR_TYPE: Mapping[ToolKind, str | None] = {
    "ok": None,
    "fail": "tool_error",
    "hang": "timeout",
    "raise": "tool_error",
    "slow": None,
    "late": "timeout",
}

#: The timeout of each kind's tool (``None``: the configured default, never reached).
TOOL_TIMEOUT: Mapping[ToolKind, float | None] = {
    "ok": None,
    "fail": None,
    "hang": HANG_TIMEOUT,
    "raise": None,
    "slow": TIMED_TIMEOUT,
    "late": TIMED_TIMEOUT,
}

#: Virtual seconds a call of each kind takes when nothing cancels it.
TOOL_SECONDS: Mapping[ToolKind, float] = {
    "ok": 0.0,
    "fail": 0.0,
    "hang": HANG_TIMEOUT,
    "raise": 0.0,
    "slow": SLOW_SECONDS,
    "late": TIMED_TIMEOUT,
}

#: Text in ``agent_error.data.error.message`` of a scripted crash and of the model's failure.
CRASH_MESSAGE = "scripted crash"
LLM_FAILURE = "the scripted model failed"


@attrs.frozen
class Turn:
    """One assistant turn: reasoning chunks, then answer chunks, then the tool calls (if any)."""

    reasoning: int = 0
    calls: tuple[ToolKind, ...] = ()
    answer: int = 0


@attrs.frozen
class AgentScript:
    """A drawn conversation: every turn but the last asks for tools; the last one answers.

    ``cancel_after``: cancel the run right after its ``cancel_after``-th event was
    received (``None``: never; ``0``: right after ``run_accepted``, maybe while queued).

    Faults (at most one): ``llm_error``: the model fails in the last turn, after its
    reasoning (instead of answering) → ``agent_error`` ``llm_error``.
    ``crash_before``: the agent raises instead of producing its ``crash_before``-th
    token (0-based, see ``planned_tokens``; the number of tokens: instead of
    returning its answer) → ``agent_error`` ``agent_error``.
    """

    turns: tuple[Turn, ...]
    cancel_after: int | None = None
    llm_error: bool = False
    crash_before: int | None = None

    def call_id(self, turn: int, index: int) -> str:
        return f"call-{turn}-{index}"

    def calls(self) -> dict[str, ToolKind]:
        """Every scripted call id and its kind."""
        return {
            self.call_id(i, j): kind
            for i, turn in enumerate(self.turns)
            for j, kind in enumerate(turn.calls)
        }

    def final_response(self) -> str:
        last = self.turns[-1]
        return "".join(answer_chunk(len(self.turns) - 1, j) for j in range(last.answer))

    def planned_tokens(self) -> list[Any]:
        """The tokens the model asks for, before any crash (an LLM failure drops the answer).

        ``"thinking"`` / ``"partial"`` per event; the tool events of one turn
        collapse into one ``("tools", turn, call ids)`` token (parallel calls may
        start and end in any order).
        """
        tokens: list[Any] = []
        last = len(self.turns) - 1
        for i, turn in enumerate(self.turns):
            answer = 0 if self.llm_error and i == last else turn.answer
            tokens += ["thinking"] * turn.reasoning + ["partial"] * answer
            if turn.calls:
                tokens.append(
                    ("tools", i, frozenset(self.call_id(i, j) for j in range(len(turn.calls))))
                )
        return tokens

    def expected_tokens(self) -> list[Any]:
        """The run's events between ``agent_started`` and its terminal, as tokens."""
        tokens = self.planned_tokens()
        return tokens if self.crash_before is None else tokens[: self.crash_before]

    def expected_terminal(self) -> tuple[str, str | None]:
        """``(terminal type, agent_error type)`` of the run when nothing cancels it."""
        if self.crash_before is not None:
            return "agent_error", "agent_error"
        if self.llm_error:
            return "agent_error", "llm_error"
        return "agent_completed", None

    def expected_duration(self) -> float:
        """Virtual seconds from ``agent_started`` to the terminal event when nothing cancels it."""
        kinds = self.calls()
        return sum(
            max(TOOL_SECONDS[kinds[call_id]] for call_id in token[2])
            for token in self.expected_tokens()
            if isinstance(token, tuple)
        )

    def tool_group_starts(self) -> list[int]:
        """1-based positions, in the run's events, of the first event of each turn's tool calls.

        That first event is always a ``tool_executing``: cancelling right after it
        catches the turn's calls in flight.
        """
        starts: list[int] = []
        position = 1  # agent_started
        for token in self.expected_tokens():
            if isinstance(token, tuple):
                starts.append(position + 1)
                position += 2 * len(token[2])
            else:
                position += 1
        return starts

    def expected_event_count(self) -> int:
        return 2 + sum(
            2 * len(token[2]) if isinstance(token, tuple) else 1 for token in self.expected_tokens()
        )


def reasoning_chunk(turn: int, index: int) -> str:
    return f"r{turn}.{index} "


def answer_chunk(turn: int, index: int) -> str:
    return f"a{turn}.{index} "


def event_tokens(frames: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The tokens of a run's events (see ``AgentScript.expected_tokens``)."""
    tokens: list[Any] = []
    for frame in frames:
        kind = frame["type"]
        if kind == "agent_thinking":
            tokens.append("thinking")
        elif kind == "partial_result":
            tokens.append("partial")
        elif kind in ("tool_executing", "tool_completed"):
            call_id = frame["data"]["call_id"]
            turn = turn_of_call(call_id)
            last = tokens[-1] if tokens else None
            if isinstance(last, tuple) and last[1] == turn:
                tokens[-1] = ("tools", turn, last[2] | {call_id})
            else:
                tokens.append(("tools", turn, frozenset({call_id})))
    return tokens


def turn_of_call(call_id: str) -> int:
    """The turn a scripted call id (``call-TURN-INDEX``) belongs to."""
    return int(call_id.split("-")[1])


def script_text(key: str) -> str:
    """The user message that selects the script registered under ``key``."""
    return f"script {key}"


class ScriptBook:
    """Scripts by key; the scripted model picks one by the user message (``script KEY``).

    Runs of one thread share a conversation history: the model plays the part of
    the conversation after the last user message (the current run's).
    """

    def __init__(self) -> None:
        self.scripts: dict[str, AgentScript] = {}
        #: Per key, the number of tool messages the model saw at each turn.
        self.tool_messages_seen: dict[str, list[int]] = {}

    def add(self, key: str, script: AgentScript) -> str:
        self.scripts[key] = script
        self.tool_messages_seen[key] = []
        return script_text(key)

    def script_for(self, text: str) -> AgentScript:
        """The script a user message (``script KEY``) selects."""
        return self.scripts[text.removeprefix("script ")]

    def turn(self, request: ChatRequest) -> ScriptedTurn:
        last_user = max(i for i, m in enumerate(request.messages) if m.role == "user")
        messages = request.messages[last_user:]
        key = messages[0].content.removeprefix("script ")
        script = self.scripts[key]
        index = sum(1 for m in messages if m.role == "assistant")
        self.tool_messages_seen[key].append(sum(1 for m in messages if m.role == "tool"))
        turn = script.turns[index]
        reasoning = tuple(reasoning_chunk(index, j) for j in range(turn.reasoning))
        if script.llm_error and index == len(script.turns) - 1:
            return ScriptedTurn(reasoning=reasoning, error=LLM_FAILURE)
        calls = tuple(
            ToolCall(script.call_id(index, j), f"{kind}_tool", _arguments(kind, index, j))
            for j, kind in enumerate(turn.calls)
        )
        return ScriptedTurn(
            reasoning=reasoning,
            tool_calls=calls,
            answer=tuple(answer_chunk(index, j) for j in range(turn.answer)),
        )


def _arguments(kind: ToolKind, turn: int, index: int) -> dict[str, Any]:
    if kind in ("ok", "slow", "late"):
        return {"value": turn * 10 + index}
    if kind in ("fail", "raise"):
        return {"message": f"scripted failure {turn}.{index}"}
    return {}


def script_tools() -> ToolRegistry:
    """One tool per ``ToolKind``: ``ok_tool``, ``fail_tool``, ``hang_tool``, ``raise_tool``,
    ``slow_tool`` and ``late_tool`` (see ``ToolKind``)."""
    registry = ToolRegistry()

    @registry.tool()
    async def ok_tool(value: int) -> dict[str, int]:
        """Return the value, doubled."""
        await trio.lowlevel.checkpoint()
        return {"value": value, "double": 2 * value}

    @registry.tool()
    async def fail_tool(message: str) -> None:
        """Always fail."""
        await trio.lowlevel.checkpoint()
        raise ToolError(message)

    @registry.tool(timeout=HANG_TIMEOUT)
    async def hang_tool() -> None:
        """Never return (ends by timeout or cancellation)."""
        await trio.sleep_forever()

    @registry.tool()
    async def raise_tool(message: str) -> None:
        """Always raise a plain exception (not a ToolError)."""
        await trio.lowlevel.checkpoint()
        raise RuntimeError(message)

    @registry.tool(timeout=TIMED_TIMEOUT)
    async def slow_tool(value: int) -> dict[str, int]:
        """Return the value, doubled, after SLOW_SECONDS (within the timeout)."""
        await trio.sleep(SLOW_SECONDS)
        return {"value": value, "double": 2 * value}

    @registry.tool(timeout=TIMED_TIMEOUT)
    async def late_tool(value: int) -> dict[str, int]:
        """Would return after LATE_SECONDS, but times out first."""
        await trio.sleep(LATE_SECONDS)
        return {"value": value, "double": 2 * value}

    return registry


class ScriptedCrash(Exception):
    """What a scripted agent raises at its crash point."""


def scripted_agent(book: ScriptBook, *, max_steps: int = 16) -> Any:
    """The tool-calling loop over the book's model, crashing where the run's script says.

    The crash point counts the agent's steps (one per ``thinking``, ``partial`` and
    ``execute_tools`` call, i.e. one per token of ``AgentScript.planned_tokens``).
    """
    loop = tool_calling_agent(max_steps=max_steps)

    async def agent(bridge: AgentWebSocketBridge) -> str:
        crash_before = book.script_for(bridge.text).crash_before
        if crash_before is None:
            return await loop(bridge)
        steps = 0

        def crash() -> ScriptedCrash:
            return ScriptedCrash(f"{CRASH_MESSAGE} before step {crash_before}")

        def counted(step: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                nonlocal steps
                if steps == crash_before:
                    raise crash()
                steps += 1
                return await step(*args, **kwargs)

            return wrapper

        bridge.thinking = counted(bridge.thinking)  # type: ignore[method-assign]
        bridge.partial = counted(bridge.partial)  # type: ignore[method-assign]
        bridge.execute_tools = counted(bridge.execute_tools)  # type: ignore[method-assign]
        answer = await loop(bridge)
        if steps == crash_before:
            raise crash()
        return answer

    return agent


def script_runtime(
    book: ScriptBook, config: Any, *, max_steps: int = 16, store: Any = None
) -> Runtime:
    """A runtime whose only agent is the tool-calling loop over the book's scripted model
    (with the scripts' crashes); ``store``: an ``EventStore`` such as ``RecordingStore``."""
    return Runtime(
        config,
        agents={"scripted": scripted_agent(book, max_steps=max_steps)},
        tools=script_tools(),
        llm=ScriptedLLMProvider(book.turn),
        store=store,
    )


def check_scripted_run(
    script: AgentScript,
    run: Sequence[Mapping[str, Any]],
    *,
    cancelled: bool | None = False,
    reasons: Collection[str] = ("client",),
    cancel_sent_at: int | None = None,
) -> None:
    """Assert that one run's events are what ``script`` (faults included) asks for.

    ``cancelled``: the run must end ``agent_cancelled`` (``True``), must not
    (``False``), or may (``None``); then its reason is one of ``reasons``, and
    its events are a prefix of the script (the last tool group possibly cut
    short). A lone ``agent_cancelled`` (cancelled while queued) is accepted when
    cancelling is. ``cancel_sent_at``: tool calls may end ``cancelled`` only from
    this 0-based event position on (``None``: anywhere, if the run was cancelled).
    Otherwise the run is the whole script and ends as ``expected_terminal()``.
    """
    assert run, "the run has no events"
    terminal = run[-1]
    assert terminal["type"] in TERMINAL_EVENTS, types_of(run)
    assert all(f["type"] not in TERMINAL_EVENTS for f in run[:-1]), types_of(run)
    if terminal["type"] == "agent_cancelled":
        assert cancelled is not False, ("the run was cancelled", types_of(run), script)
        assert terminal["data"]["reason"] in reasons, (terminal["data"], reasons)
    else:
        assert cancelled is not True, ("the run was not cancelled", types_of(run), script)
    if len(run) == 1 and terminal["type"] == "agent_cancelled":
        return  # cancelled while queued
    assert run[0]["type"] == "agent_started", types_of(run)

    expected = script.expected_tokens()
    actual = event_tokens(run[1:-1])
    kinds = script.calls()

    for frame in of_type(run, "agent_thinking"):
        turn = int(frame["data"]["reasoning"][1:].split(".")[0])
        assert frame["data"]["step"] == turn, frame
    for frame in of_type(run, "tool_executing"):
        assert frame["data"]["call_id"] in kinds, frame

    # When each tool call ended: before the cancel was sent, or possibly after it.
    position = {id(f): i for i, f in enumerate(run)}
    for frame in of_type(run, "tool_completed"):
        data = frame["data"]
        kind = kinds[data["call_id"]]
        assert data["tool_name"] == f"{kind}_tool"
        allowed = {EXPECTED_STATUS[kind]}
        if terminal["type"] == "agent_cancelled" and (
            cancel_sent_at is None or position[id(frame)] >= cancel_sent_at
        ):
            allowed.add("cancelled")
        assert data["status"] in allowed, (data, terminal, script)
        if data["status"] == "cancelled":
            assert data["error"]["type"] == "cancelled"
        elif data["status"] != "ok":
            assert data["error"]["type"] == EXPECTED_ERROR_TYPE[kind]
        else:
            value = data_value(frame, run)
            assert data["results"] == {"value": value, "double": 2 * value}

    if terminal["type"] == "agent_cancelled":
        # A prefix of the script; the last tool group may be cut short by the cancel.
        assert len(actual) <= len(expected), (actual, expected)
        if actual:
            assert actual[:-1] == expected[: len(actual) - 1], (actual, expected)
            last, planned = actual[-1], expected[len(actual) - 1]
            if isinstance(last, tuple):
                assert isinstance(planned, tuple), (actual, expected)
                assert last[1] == planned[1], (actual, expected)
                assert last[2] <= planned[2], (actual, expected)
            else:
                assert last == planned, (actual, expected)
        return

    # Not cancelled: the whole script ran, and it ended as the script says.
    kind, error_type = script.expected_terminal()
    assert terminal["type"] == kind, (terminal, script)
    assert actual == expected, (actual, expected)
    if kind == "agent_completed":
        assert terminal["data"]["final_response"] == script.final_response()
    else:
        error = terminal["data"]["error"]
        assert error["type"] == error_type, (error, script)
        if error_type == "agent_error":
            assert CRASH_MESSAGE in error["message"], error
        else:
            assert LLM_FAILURE in error["message"], error
    assert all(f["data"]["status"] != "cancelled" for f in of_type(run, "tool_completed"))


def check_run_against_script(
    script: AgentScript, run: Sequence[Mapping[str, Any]], outcome: str | None
) -> None:
    """Assert that one run's events are what ``script`` asks for, given the cancel outcome.

    ``outcome`` is the ``CancelOutcome.state`` of the cancel sent after event
    ``script.cancel_after`` (``None`` when no cancel was sent). A cancel answered
    ``active`` always ends the run ``agent_cancelled`` (reason ``client``).
    """
    assert outcome in (None, "active", "not_found"), outcome
    assert run, "the run has no events"
    assert run[0]["type"] == "agent_started", types_of(run)
    check_scripted_run(
        script,
        run,
        cancelled=outcome == "active",
        reasons=("client",),
        cancel_sent_at=script.cancel_after if outcome is not None else None,
    )


def check_cancel_timing(
    script: AgentScript,
    run: Sequence[Mapping[str, Any]],
    times: Sequence[float],
    cancel_time: float | None,
) -> None:
    """Assert when things happened (virtual time; only timed, late and hanging tools take time).

    A call that timed out ran its full timeout and ended no later than the
    cancel; one that was cancelled ended at the cancel; a cancelled run ended at
    the cancel, without waiting for anything.
    """
    assert len(times) == len(run)
    started_at = {
        f["data"]["call_id"]: t
        for f, t in zip(run, times, strict=True)
        if f["type"] == "tool_executing"
    }
    kinds = script.calls()
    for frame, at in zip(run, times, strict=True):
        if frame["type"] != "tool_completed":
            continue
        data = frame["data"]
        kind = kinds[data["call_id"]]
        if data["status"] == "timeout":
            timeout = TOOL_TIMEOUT[kind]
            assert EXPECTED_STATUS[kind] == "timeout", data
            assert timeout is not None, data
            assert at - started_at[data["call_id"]] >= timeout, (at, started_at, data)
            if cancel_time is not None and run[-1]["type"] == "agent_cancelled":
                assert at <= cancel_time, "a call in flight at the cancel timed out instead"
        if data["status"] == "cancelled":
            assert cancel_time is not None
            assert at == cancel_time, (at, cancel_time, data)
    if run[-1]["type"] == "agent_cancelled":
        assert cancel_time is not None
        assert times[-1] == cancel_time, "the cancelled run did not end at once"


def data_value(tool_completed: Mapping[str, Any], run: Sequence[Mapping[str, Any]]) -> int:
    """The ``value`` argument of the call that ``tool_completed`` ends."""
    call_id = tool_completed["data"]["call_id"]
    started = next(f for f in of_type(run, "tool_executing") if f["data"]["call_id"] == call_id)
    return int(started["data"]["parameters"]["value"])


# --- hypothesis strategies ---------------------------------------------------------------------

#: The kinds the original properties draw (succeed, fail, hang).
tool_kinds: st.SearchStrategy[ToolKind] = st.sampled_from(("ok", "fail", "hang"))
#: Every kind, faults included: exceptions, timeouts, slow calls within their timeout.
all_tool_kinds: st.SearchStrategy[ToolKind] = st.sampled_from(
    ("ok", "fail", "hang", "raise", "slow", "late")
)
#: Every kind, mostly those that take time (so runs overlap and threads get busy).
timed_tool_kinds: st.SearchStrategy[ToolKind] = st.sampled_from(
    ("ok", "fail", "raise", "slow", "late", "hang", "slow", "late", "hang")
)


@attrs.frozen
class _Thinking:
    chunks: int


@attrs.frozen
class _Tools:
    kinds: tuple[ToolKind, ...]


def thinking_steps() -> st.SearchStrategy[_Thinking]:
    return st.builds(_Thinking, st.integers(min_value=1, max_value=3))


def tool_steps(kinds: st.SearchStrategy[ToolKind] = tool_kinds) -> st.SearchStrategy[_Tools]:
    """One tool call, or 2-3 parallel ones."""
    single = kinds.map(lambda kind: _Tools((kind,)))
    parallel = st.lists(kinds, min_size=2, max_size=3).map(lambda ks: _Tools(tuple(ks)))
    return st.one_of(single, parallel)


@st.composite
def agent_scripts(
    draw: st.DrawFn,
    *,
    max_steps: int = 6,
    cancel: bool = True,
    kinds: st.SearchStrategy[ToolKind] = tool_kinds,
    faults: bool = False,
    cancel_at_accept: bool = False,
    min_tool_steps: int = 0,
) -> AgentScript:
    """Thinking and tool steps in any order, then an answer of 0-4 chunks; maybe a cancel point.

    ``kinds``: the tool kinds drawn (``all_tool_kinds`` for tool faults);
    ``faults``: maybe an LLM failure or an agent crash at any step;
    ``cancel_at_accept``: the cancel point may be 0 (right after ``run_accepted``);
    ``min_tool_steps``: at least this many tool steps (runs that take time).
    """
    steps = draw(st.lists(st.one_of(thinking_steps(), tool_steps(kinds)), max_size=max_steps))
    for _ in range(min_tool_steps - sum(isinstance(step, _Tools) for step in steps)):
        steps.insert(draw(st.integers(0, len(steps))), draw(tool_steps(kinds)))
    answer = draw(st.integers(min_value=0, max_value=4))
    turns: list[Turn] = []
    reasoning = 0
    for step in steps:
        if isinstance(step, _Thinking):
            reasoning += step.chunks
        else:
            turns.append(Turn(reasoning=reasoning, calls=step.kinds))
            reasoning = 0
    turns.append(Turn(reasoning=reasoning, answer=answer))
    script = AgentScript(tuple(turns))
    if faults:
        fault = draw(st.sampled_from(("none", "none", "llm_error", "crash")))
        if fault == "llm_error":
            script = attrs.evolve(script, llm_error=True)
        elif fault == "crash":
            steps_planned = len(script.planned_tokens())
            crash = draw(st.integers(min_value=0, max_value=steps_planned))
            script = attrs.evolve(script, crash_before=crash)
    cancel_after = None
    if cancel:
        first = 0 if cancel_at_accept else 1
        points = st.none() | st.integers(min_value=first, max_value=script.expected_event_count())
        if script.tool_group_starts():
            points |= st.sampled_from(script.tool_group_starts())
        cancel_after = draw(points)
    return attrs.evolve(script, cancel_after=cancel_after)


def faulty_scripts(
    *,
    max_steps: int = 3,
    cancel: bool = True,
    min_tool_steps: int = 0,
    kinds: st.SearchStrategy[ToolKind] = all_tool_kinds,
) -> st.SearchStrategy[AgentScript]:
    """Short scripts with every tool kind and maybe an LLM failure or a crash; cancel points
    include 0 (right after ``run_accepted``)."""
    return agent_scripts(
        max_steps=max_steps,
        cancel=cancel,
        kinds=kinds,
        faults=True,
        cancel_at_accept=True,
        min_tool_steps=min_tool_steps,
    )


# --- the server's side of a stream -------------------------------------------------------------


class RecordingStore:
    """An ``EventStore`` that keeps every event of every session and the virtual time it
    was stamped: the server's side of each stream, which every connection of the session
    must have received (the window forgets; this does not)."""

    def __init__(self) -> None:
        self.events: dict[str, list[Event]] = {}
        self.times: dict[str, list[float]] = {}

    async def append(self, session_id: str, events: Sequence[Event]) -> None:
        now = trio.current_time()
        self.events.setdefault(session_id, []).extend(events)
        self.times.setdefault(session_id, []).extend(now for _ in events)

    def last_seq(self, session_id: str) -> int:
        return len(self.events.get(session_id, ()))

    def frames(self, session_id: str) -> list[Frame]:
        """The session's whole stream (``seq`` 1, 2, ...) as the frames clients receive."""
        return [json.loads(event.frame) for event in self.events.get(session_id, ())]

    def run_times(self, session_id: str, run_id: str) -> list[float]:
        """When each event of ``run_id`` was stamped (virtual time)."""
        return [
            at
            for event, at in zip(self.events[session_id], self.times[session_id], strict=True)
            if event.run_id == run_id
        ]


def stream_start(ready: Mapping[str, Any]) -> int:
    """The ``seq`` after which a connection's stream starts, by its ``session_ready``."""
    after = ready.get("after_seq")
    return int(ready["last_seq"] if after is None else after)


def check_joined_stream(
    ready: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    stream: Sequence[Mapping[str, Any]],
    *,
    complete: bool = True,
) -> None:
    """What a connection received from ``ready`` on, against the session's whole ``stream``.

    Its events start right after the point ``ready`` names (``after_seq``, else
    ``last_seq``), have no gap and are the stream's own. The lifecycle grammar
    holds for them: strictly (``session_ready`` then gap-free events) when no run
    was under way at the join; else over the runs that began after the join
    (runs already under way are then checked as the rest of the stream's runs).
    ``complete``: every run it saw begin must have ended in what it received.
    """
    start = stream_start(ready)
    seqs = [f["seq"] for f in events]
    assert seqs == list(range(start + 1, start + 1 + len(seqs))), (start, seqs[:5])
    assert list(events) == list(stream[start : start + len(events)]), "not the session's events"
    begun = {f["run_id"] for f in stream[:start]}
    if not begun & {f["run_id"] for f in events}:
        check_lifecycle([ready, *events], require_terminal=complete)
    else:
        own = [f for f in events if f["run_id"] not in begun]
        check_lifecycle(own, strict_seq=False, require_terminal=complete)


def check_thread_order(
    stream: Sequence[Mapping[str, Any]], accepted: Sequence[tuple[str, str]]
) -> None:
    """Per thread, a run starts only after every run of its thread accepted before it has
    ended: runs of a thread never overlap and start in the order they were accepted.

    ``accepted``: ``(run_id, thread_id)`` in the order the runs were accepted.
    """
    started: dict[str, int] = {}
    ended: dict[str, int] = {}
    for frame in stream:
        if frame["type"] == "agent_started":
            started[frame["run_id"]] = frame["seq"]
        if frame["type"] in TERMINAL_EVENTS:
            ended[frame["run_id"]] = frame["seq"]
    for thread in {t for _, t in accepted}:
        runs = [r for r, t in accepted if t == thread]
        for index, run_id in enumerate(runs):
            if run_id not in started:
                continue
            for earlier in runs[:index]:
                assert earlier in ended, f"thread {thread!r}: {run_id} started before {earlier}"
                assert ended[earlier] < started[run_id], (
                    f"thread {thread!r}: {run_id} started (seq {started[run_id]}) before"
                    f" {earlier} ended (seq {ended[earlier]})"
                )


# --- a browser tab: a connection that may read slowly, drop and resume -------------------------


@attrs.define
class TabSegment:
    """What one connection of a tab received (a tab reconnects: several segments)."""

    after_seq: int | None  # the resume point the connection asked for (None: fresh)
    session_hint: str | None
    opened_at: float
    frames: list[Frame] = attrs.field(factory=list)
    close_code: int | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def ready(self) -> Frame:
        assert self.frames, "no frame yet"
        assert self.frames[0]["type"] == "session_ready", self.frames[0]
        return self.frames[0]

    @property
    def session_id(self) -> str:
        return str(self.ready["session_id"])

    @property
    def events(self) -> list[Frame]:
        return [f for f in self.frames if is_event(f)]

    def replies(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if not is_event(f) and f["type"] == kind]


class Tab:
    """One browser tab of a user: a connection to the user's session that may read slowly
    (it sleeps ``read_delay`` virtual seconds after each frame), be dropped, and resume
    with ``after_seq`` = the last ``seq`` it saw (and the session id as hint).

    ``events`` are the events of its current session over all its connections,
    de-duplicated by ``seq`` (a ``seq`` received twice must be the same event).
    Request/reply exchanges and drops hold ``lock``, so a reply is never lost to a drop.
    """

    def __init__(
        self,
        user_id: str,
        *,
        read_delay: float = 0.0,
        capacity: int = 256,
        name: str = "",
        batch: int = 1,
    ) -> None:
        self.user_id = user_id
        #: Asks for multi-event frames of up to ``batch`` events (unwrapped on receipt:
        #: ``multi_frames`` counts them).
        self.batch = batch
        self.multi_frames = 0
        self.name = name
        self.read_delay = read_delay
        self.capacity = capacity
        self.segments: list[TabSegment] = []
        self.lock = trio.Lock()
        #: Session objects seen while they lived (for end-of-test statistics).
        self.sessions: list[Any] = []
        self._streams: dict[str, dict[int, Frame]] = {}
        self._terminals: set[str] = set()
        self._changed = trio.Event()
        self._transport: Any = None

    # -- what it received ---------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self.segments[-1].session_id

    @property
    def events(self) -> list[Frame]:
        stream = self._streams.get(self.session_id, {})
        return [stream[seq] for seq in sorted(stream)]

    @property
    def last_seq(self) -> int:
        """The last ``seq`` it has seen of its current session (where a resume starts)."""
        stream = self._streams.get(self.session_id, {})
        first = next(s for s in self.segments if s.session_id == self.session_id)
        return max(stream, default=stream_start(first.ready))

    @property
    def connected(self) -> bool:
        return bool(self.segments) and not self.segments[-1].closed.is_set()

    def has_ended(self, run_id: str) -> bool:
        return run_id in self._terminals

    def has_passed(self, run_id: str, count: int, store: RecordingStore) -> bool:
        """Whether the tab has ``count`` events of ``run_id``, its terminal, or has seen the
        stream past that terminal (a tab that joined after the run ended never sees it)."""
        if run_id in self._terminals or len(self.run_events(run_id)) >= count:
            return True
        stream = store.events.get(self.session_id, ())
        end = next(
            (e.seq for e in stream if e.run_id == run_id and e.type in TERMINAL_EVENTS), None
        )
        return end is not None and self.last_seq >= end

    def run_events(self, run_id: str) -> list[Frame]:
        return [f for f in self.events if f["run_id"] == run_id]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (over reconnections) until ``predicate()`` holds."""
        while not predicate():
            await self._changed.wait()

    # -- connections ----------------------------------------------------------------------

    async def open(
        self, nursery: trio.Nursery, runtime: Runtime, *, resume: bool = False
    ) -> TabSegment:
        """Connect (resuming after ``last_seq`` when ``resume``); returns after ``session_ready``."""
        after_seq = self.last_seq if resume else None
        hint = self.session_id if resume else None
        server_end, client_end = memory_transport_pair(self.capacity)
        segment = TabSegment(after_seq, hint, trio.current_time())
        self.segments.append(segment)
        self._transport = client_end
        nursery.start_soon(
            partial(
                runtime.serve_connection,
                self.user_id,
                server_end,
                after_seq=after_seq,
                session_hint=hint,
                batch=self.batch,
            )
        )
        nursery.start_soon(self._read, client_end, segment)
        await self.wait_until(lambda: bool(segment.frames) or segment.closed.is_set())
        assert segment.ready["user_id"] == self.user_id
        assert segment.ready["protocol"] == 1
        session = runtime.manager.session_for(self.user_id)
        if session is not None and session not in self.sessions:
            self.sessions.append(session)
        return segment

    async def _read(self, transport: Any, segment: TabSegment) -> None:
        try:
            while True:
                raw = await transport.receive()
                assert isinstance(raw, str), f"the server sent a binary frame: {raw!r}"
                decoded = json.loads(raw)
                if decoded["type"] == "events":
                    assert self.batch > 1, "multi-event frame sent to a tab that did not ask"
                    assert 2 <= len(decoded["events"]) <= self.batch, decoded
                    self.multi_frames += 1
                    frames = decoded["events"]
                else:
                    frames = [decoded]
                for frame in frames:
                    segment.frames.append(frame)
                    if len(segment.frames) == 1:
                        self._streams.setdefault(segment.session_id, {})
                    if is_event(frame):
                        stream = self._streams[segment.session_id]
                        seen = stream.setdefault(frame["seq"], frame)
                        assert seen == frame, f"seq {frame['seq']} twice, different: {frame}"
                        if frame["type"] in TERMINAL_EVENTS:
                            self._terminals.add(frame["run_id"])
                self._notify()
                if self.read_delay:
                    await trio.sleep(self.read_delay)
        except TransportClosed as exc:
            segment.close_code = exc.code
        finally:
            segment.closed.set()
            self._notify()

    async def _close(self) -> None:
        segment = self.segments[-1]
        await self._transport.close(1000)
        await segment.closed.wait()

    async def close(self) -> None:
        async with self.lock:
            await self._close()

    async def drop_and_resume(
        self, nursery: trio.Nursery, runtime: Runtime, pause: float
    ) -> TabSegment:
        """Close the connection, wait ``pause`` s, reconnect after the last ``seq`` seen."""
        async with self.lock:
            await self._close()
            await trio.sleep(pause)
            return await self.open(nursery, runtime, resume=True)

    # -- exchanges --------------------------------------------------------------------------

    async def _send(self, **frame: Any) -> None:
        await self._transport.send_text(json.dumps(frame))

    async def user_message(
        self,
        key: str,
        text: str,
        *,
        thread: str,
        policy: str | None = None,
        prepare: Callable[[], Awaitable[Any]] | None = None,
    ) -> Frame:
        """Send a ``user_message`` (``client_msg_id`` = ``key``); its ``run_accepted`` or ``error``.

        ``prepare`` is awaited with the tab's lock held, right before sending (e.g. to
        wait until the runtime is at rest and predict the reply).
        """
        fields: dict[str, Any] = {"thread_id": thread, "client_msg_id": key}
        if policy is not None:
            fields["policy"] = policy
        async with self.lock:
            if prepare is not None:
                await prepare()
            segment = self.segments[-1]
            mark = len(segment.frames)
            await self._send(type="user_message", text=text, **fields)

            def reply() -> Frame | None:
                return next(
                    (
                        f
                        for f in segment.frames[mark:]
                        if f["type"] in ("run_accepted", "error") and f.get("client_msg_id") == key
                    ),
                    None,
                )

            await self.wait_until(lambda: reply() is not None or segment.closed.is_set())
            found = reply()
            assert found is not None, f"closed ({segment.close_code}) before the reply to {key}"
            return found

    async def cancel(self, run_id: str, key: str) -> str | None:
        """Cancel ``run_id``; the error code it was answered with (``None``: no error, the
        run was queued or active). A ``ping`` after it tells when the answer is complete."""
        async with self.lock:
            segment = self.segments[-1]
            mark = len(segment.frames)
            await self._send(type="cancel", run_id=run_id, client_msg_id=key)
            await self._send(type="ping")

            def answered() -> bool:
                return any(f["type"] == "pong" for f in segment.frames[mark:])

            await self.wait_until(lambda: answered() or segment.closed.is_set())
            assert answered(), f"closed ({segment.close_code}) before the answer to {key}"
            errors = [
                f
                for f in segment.frames[mark:]
                if f["type"] == "error" and f.get("client_msg_id") == key
            ]
            return str(errors[0]["code"]) if errors else None


# --- client behaviour and several users: scenarios ---------------------------------------------

THREADS = ("a", "b")
#: A message's ``policy`` field (``None``: the configured ``thread_policy``).
MESSAGE_POLICIES = (None, "enqueue", "reject", "interrupt")


@attrs.frozen
class Settle:
    """Act once nothing in the runtime can move at this instant: the outcome is then exact."""


@attrs.frozen
class AfterEvents:
    """Act once the acting tab has ``count`` events of the user's ``run``-th accepted run
    (modulo their number; at once when there is none), or the run's terminal."""

    run: int
    count: int


@attrs.frozen
class Pause:
    """Act after ``seconds`` of virtual time."""

    seconds: float


Trigger = Settle | AfterEvents | Pause


@attrs.frozen
class SendMessage:
    """A ``user_message`` playing ``script`` (which may carry faults and a cancel point)."""

    script: AgentScript
    thread: str
    policy: str | None
    tab: int  # of the tabs open at the time, modulo their number
    when: Trigger


@attrs.frozen
class DropTab:
    """The tab's connection drops; ``pause`` s later it resumes after the last ``seq`` it saw."""

    tab: int
    when: Trigger
    pause: float


Action = SendMessage | DropTab


@attrs.frozen
class TabPlan:
    """A tab: how it reads (``read_delay`` s after each frame, ``capacity`` frames of buffer)
    and when it opens (before action ``join_at``; 0: from the start; after the last one)."""

    read_delay: float
    capacity: int
    join_at: int
    #: Multi-event frames: at most this many events per frame (1: one per frame).
    batch: int = 1


@attrs.frozen
class UserPlan:
    """One user's tabs and what they do, one action after another."""

    tabs: tuple[TabPlan, ...]
    actions: tuple[Action, ...]


@attrs.frozen
class Scenario:
    """Several users acting at once on one runtime with these thread settings."""

    policy: str
    max_active: int
    max_queued: int
    users: tuple[UserPlan, ...]


def triggers() -> st.SearchStrategy[Trigger]:
    return st.one_of(
        st.just(Settle()),
        st.builds(AfterEvents, st.integers(min_value=0, max_value=3), st.integers(0, 12)),
        st.builds(Pause, st.sampled_from((0.5, 1.0, 2.0, 4.0))),
    )


def send_actions(
    scripts: st.SearchStrategy[AgentScript] | None = None,
) -> st.SearchStrategy[SendMessage]:
    if scripts is None:
        scripts = st.one_of(
            faulty_scripts(), faulty_scripts(min_tool_steps=1, kinds=timed_tool_kinds)
        )
    return st.builds(
        SendMessage,
        scripts,
        st.sampled_from(THREADS),
        st.sampled_from(MESSAGE_POLICIES),
        st.integers(min_value=0, max_value=2),
        triggers(),
    )


def drop_actions() -> st.SearchStrategy[DropTab]:
    return st.builds(
        DropTab,
        st.integers(min_value=0, max_value=2),
        triggers(),
        st.sampled_from((0.0, 0.5, 3.0)),
    )


@st.composite
def tab_plans(draw: st.DrawFn, *, join_at: int | None = None, max_join: int = 0) -> TabPlan:
    """A fast or slow tab (slow ones have a small transport buffer, so the server waits)."""
    delay = draw(st.sampled_from((0.0, 0.0, 0.25, 1.0)))
    capacity = draw(st.sampled_from((2, 256))) if delay else 256
    join = join_at if join_at is not None else draw(st.integers(0, max_join))
    return TabPlan(delay, capacity, join, draw(st.sampled_from((1, 1, 3, 64))))


@st.composite
def user_plans(draw: st.DrawFn, *, max_actions: int = 5, max_tabs: int = 3) -> UserPlan:
    """1-3 tabs (the first open from the start), 1-``max_actions`` sends and drops."""
    actions = draw(
        st.lists(
            st.one_of(send_actions(), send_actions(), drop_actions()),
            min_size=1,
            max_size=max_actions,
        )
    )
    extra = draw(st.integers(min_value=0, max_value=max_tabs - 1))
    tabs = [draw(tab_plans(join_at=0))]
    tabs += [draw(tab_plans(max_join=len(actions))) for _ in range(extra)]
    return UserPlan(tuple(tabs), tuple(actions))


def scenarios(*, max_users: int = 4, max_actions: int = 5) -> st.SearchStrategy[Scenario]:
    """1-``max_users`` users, each with its own tabs and actions, under drawn thread settings."""
    return st.builds(
        Scenario,
        st.sampled_from(("enqueue", "reject", "interrupt")),
        st.integers(min_value=1, max_value=3),
        st.integers(min_value=1, max_value=2),
        st.lists(user_plans(max_actions=max_actions), min_size=1, max_size=max_users).map(tuple),
    )


def expected_admission(
    stream: Sequence[Mapping[str, Any]],
    thread_runs: Sequence[str],
    policy: str,
    max_queued: int,
) -> tuple[str, list[str]]:
    """What a ``user_message`` must get when the runtime is at rest: ``(reply, interrupted)``.

    ``stream``: the session's events so far; ``thread_runs``: the runs accepted on
    the message's thread so far. ``reply`` is ``"accepted"`` or an error code;
    ``interrupted`` the runs an accepted ``interrupt`` ends with reason ``interrupted``.
    """
    started = {f["run_id"] for f in stream if f["type"] == "agent_started"}
    ended = {f["run_id"] for f in stream if f["type"] in TERMINAL_EVENTS}
    waiting = [r for r in thread_runs if r not in ended]
    if not waiting:
        return "accepted", []
    if policy == "reject":
        return "busy", []
    if policy == "interrupt":
        return "accepted", waiting
    queued = [r for r in waiting if r not in started]
    return ("limit_exceeded" if len(queued) >= max_queued else "accepted"), []


# --- a reference model of one session ----------------------------------------------------------


@attrs.define
class ModelRun:
    """One accepted run in the model: when it starts and ends, and how."""

    key: str  # the client_msg_id of its user_message
    thread: str
    duration: float  # virtual seconds from start to terminal when nothing cancels it
    natural: tuple[str, str | None] = ("agent_completed", None)  # its terminal, error type
    session: int = 1  # which of the user's sessions it ran in (1st, 2nd, ...)
    start: float | None = None
    end: float | None = None
    terminal: str | None = None
    detail: str | None = None  # the cancel reason, or the agent_error type

    @property
    def lone(self) -> bool:
        """Cancelled while queued: its only event is ``agent_cancelled``."""
        return self.terminal is not None and self.start is None


@attrs.define
class SessionModel:
    """What one user's session should do, as a plain discrete-event simulation.

    Thread policies (``enqueue`` / ``reject`` / ``interrupt``), the per-thread
    queue limit, the per-user cap on active runs (queued runs start in arrival
    order), cancels, runs that end by themselves after their duration, the
    user's connections, and idle teardown (``idle_grace`` s with no connection
    and no run closes the session; the next connection starts a new one).
    Generalizes the queue model of ``test_thread_policies``.
    """

    policy: str
    max_active: int
    max_queued: int
    idle_grace: float = math.inf
    now: float = 0.0
    pending: list[ModelRun] = attrs.field(factory=list)
    active: list[ModelRun] = attrs.field(factory=list)
    runs: list[ModelRun] = attrs.field(factory=list)  # accepted, in order
    replies: dict[str, str] = attrs.field(factory=dict)  # key -> "accepted" / "ok" / error code
    tabs: int = 0
    alive: bool = False
    session: int = 0  # sessions started so far (the current one's number while alive)
    idle_since: float | None = None

    @property
    def idle(self) -> bool:
        return self.tabs == 0 and not self.active and not self.pending

    def _became(self, at: float) -> None:
        if self.idle and self.idle_since is None:
            self.idle_since = at

    def _finish(self, run: ModelRun, at: float, kind: str, detail: str | None = None) -> None:
        run.end, run.terminal, run.detail = at, kind, detail
        if run in self.active:
            self.active.remove(run)
        if run in self.pending:
            self.pending.remove(run)
        self._became(at)

    def _start_eligible(self) -> None:
        busy = {r.thread for r in self.active}
        for run in list(self.pending):
            if len(self.active) >= self.max_active:
                break
            if run.thread in busy:
                continue
            self.pending.remove(run)
            busy.add(run.thread)
            run.start = self.now
            self.active.append(run)

    def _ends(self, run: ModelRun) -> float:
        assert run.start is not None
        return run.start + run.duration

    def advance(self, to: float) -> None:
        """Let runs end (and queued ones start), and an idle session close, up to time ``to``."""
        while self.active:
            run = min(self.active, key=self._ends)
            if self._ends(run) > to:
                break
            self.now = self._ends(run)
            kind, detail = run.natural
            self._finish(run, self.now, kind, detail)
            self._start_eligible()
        self.now = to
        if (
            self.alive
            and self.idle
            and self.idle_since is not None
            and self.idle_since + self.idle_grace <= to
        ):
            self.alive = False

    def connect(self) -> bool:
        """A connection opens; whether it started a new session."""
        new = not self.alive
        if new:
            self.alive = True
            self.session += 1
        self.tabs += 1
        self.idle_since = None
        return new

    def disconnect(self) -> None:
        assert self.tabs > 0
        self.tabs -= 1
        self._became(self.now)

    def send(
        self,
        key: str,
        thread: str,
        policy: str | None,
        *,
        duration: float = 0.0,
        natural: tuple[str, str | None] = ("agent_completed", None),
    ) -> str:
        """A ``user_message``; returns (and records) ``"accepted"`` or the error code."""
        assert self.alive, "a message needs a session"
        policy = policy or self.policy
        running = [r for r in self.active if r.thread == thread]
        waiting = [r for r in self.pending if r.thread == thread]
        if running or waiting:
            if policy == "reject":
                self.replies[key] = "busy"
                return "busy"
            if policy == "interrupt":
                for run in running + waiting:
                    self._finish(run, self.now, "agent_cancelled", "interrupted")
            elif len(waiting) >= self.max_queued:
                self.replies[key] = "limit_exceeded"
                return "limit_exceeded"
        run = ModelRun(key, thread, duration, natural, session=self.session)
        self.replies[key] = "accepted"
        self.runs.append(run)
        self.pending.append(run)
        self._start_eligible()
        self.advance(self.now)  # runs that end at once
        return "accepted"

    def cancel(self, key: str, run: ModelRun | None) -> str:
        """A ``cancel``; returns (and records) ``"ok"`` or ``"not_found"``."""
        if run is None or run.terminal is not None:
            self.replies[key] = "not_found"
            return "not_found"
        self.replies[key] = "ok"
        self._finish(run, self.now, "agent_cancelled", "client")
        self._start_eligible()
        self.advance(self.now)
        return "ok"


@attrs.frozen
class SendCommand:
    """A burst of messages on one thread, one per policy (``None``: the configured one),
    back to back, each playing ``script``: queues fill up, then get interrupted or refused."""

    thread: str
    policies: tuple[str | None, ...]
    script: AgentScript
    tab: int


@attrs.frozen
class CancelCommand:
    back: int  # the accepted run this many before the newest (modulo their number)
    tab: int


@attrs.frozen
class ConnectCommand:
    resume: bool  # reopen the tab closed last, after the last seq it saw


@attrs.frozen
class DisconnectCommand:
    tab: int
    every_tab: bool  # close every open tab (the session may then idle out)


@attrs.frozen
class WaitCommand:
    seconds: float


Command = SendCommand | CancelCommand | ConnectCommand | DisconnectCommand | WaitCommand


@attrs.frozen
class Program:
    """Commands against one user's session, under these thread settings."""

    policy: str
    max_active: int
    max_queued: int
    commands: tuple[Command, ...]


def session_programs(*, max_commands: int = 14) -> st.SearchStrategy[Program]:
    """Mostly messages (faulty scripts, most of which take time), then cancels of recent
    runs, tabs opening, closing and resuming, and waits."""
    scripts = st.one_of(
        faulty_scripts(cancel=False),
        faulty_scripts(cancel=False, min_tool_steps=1, kinds=timed_tool_kinds),
    )
    sends = st.builds(
        SendCommand,
        st.sampled_from(("a", "a", "b")),  # mostly one thread: it gets busy, queues fill up
        st.lists(st.sampled_from(MESSAGE_POLICIES), min_size=1, max_size=3).map(tuple),
        scripts,
        st.integers(min_value=0, max_value=2),
    )
    waits = st.builds(WaitCommand, st.sampled_from((1.0, 2.0, 3.0, 5.0)))
    commands = st.one_of(
        sends,
        sends,
        sends,
        sends,
        st.builds(CancelCommand, st.integers(0, 3), st.integers(0, 2)),
        st.builds(ConnectCommand, st.booleans()),
        st.builds(DisconnectCommand, st.integers(0, 2), st.booleans()),
        waits,
        waits,
    )
    return st.builds(
        Program,
        st.sampled_from(("enqueue", "enqueue", "reject", "interrupt")),
        st.sampled_from((1, 1, 2)),  # mostly one active run: other threads' runs queue
        st.integers(min_value=1, max_value=2),
        st.lists(commands, min_size=4, max_size=max_commands).map(tuple),
    )
