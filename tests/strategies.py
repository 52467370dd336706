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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs
import trio
from hypothesis import strategies as st

from netra_actors import (
    ChatRequest,
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
from netra_actors.testing import TERMINAL_EVENTS

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

ToolKind = Literal["ok", "fail", "hang"]

#: Virtual seconds a ``hang_tool`` call may run before it ends with status ``timeout``.
HANG_TIMEOUT = 5.0

#: ``tool_completed.data.status`` each kind of call ends with when nothing cancels it.
EXPECTED_STATUS: Mapping[ToolKind, str] = {"ok": "ok", "fail": "error", "hang": "timeout"}

#: ``tool_completed.data.error.type`` when the status is not ``ok``.
EXPECTED_ERROR_TYPE: Mapping[ToolKind, str | None] = {
    "ok": None,
    "fail": "tool_error",
    "hang": "timeout",
}


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
    received (``None``: never).
    """

    turns: tuple[Turn, ...]
    cancel_after: int | None = None

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

    def expected_tokens(self) -> list[Any]:
        """The run's events between ``agent_started`` and its terminal, as tokens.

        ``"thinking"`` / ``"partial"`` per event; the tool events of one turn
        collapse into one ``("tools", turn, call ids)`` token (parallel calls may
        start and end in any order).
        """
        tokens: list[Any] = []
        for i, turn in enumerate(self.turns):
            tokens += ["thinking"] * turn.reasoning + ["partial"] * turn.answer
            if turn.calls:
                tokens.append(
                    ("tools", i, frozenset(self.call_id(i, j) for j in range(len(turn.calls))))
                )
        return tokens

    def tool_group_starts(self) -> list[int]:
        """1-based positions, in the run's events, of the first event of each turn's tool calls.

        That first event is always a ``tool_executing``: cancelling right after it
        catches the turn's calls in flight.
        """
        starts: list[int] = []
        position = 1  # agent_started
        for turn in self.turns:
            position += turn.reasoning + turn.answer
            if turn.calls:
                starts.append(position + 1)
                position += 2 * len(turn.calls)
        return starts

    def expected_event_count(self) -> int:
        return 2 + sum(t.reasoning + t.answer + 2 * len(t.calls) for t in self.turns)


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
    """Scripts by key; the scripted model picks one by the user message (``script KEY``)."""

    def __init__(self) -> None:
        self.scripts: dict[str, AgentScript] = {}
        #: Per key, the number of tool messages the model saw at each turn.
        self.tool_messages_seen: dict[str, list[int]] = {}

    def add(self, key: str, script: AgentScript) -> str:
        self.scripts[key] = script
        self.tool_messages_seen[key] = []
        return script_text(key)

    def turn(self, request: ChatRequest) -> ScriptedTurn:
        user = next(m.content for m in request.messages if m.role == "user")
        key = user.removeprefix("script ")
        script = self.scripts[key]
        index = sum(1 for m in request.messages if m.role == "assistant")
        self.tool_messages_seen[key].append(sum(1 for m in request.messages if m.role == "tool"))
        turn = script.turns[index]
        calls = tuple(
            ToolCall(script.call_id(index, j), f"{kind}_tool", _arguments(kind, index, j))
            for j, kind in enumerate(turn.calls)
        )
        return ScriptedTurn(
            reasoning=tuple(reasoning_chunk(index, j) for j in range(turn.reasoning)),
            tool_calls=calls,
            answer=tuple(answer_chunk(index, j) for j in range(turn.answer)),
        )


def _arguments(kind: ToolKind, turn: int, index: int) -> dict[str, Any]:
    if kind == "ok":
        return {"value": turn * 10 + index}
    if kind == "fail":
        return {"message": f"scripted failure {turn}.{index}"}
    return {}


def script_tools() -> ToolRegistry:
    """``ok_tool`` returns a value, ``fail_tool`` raises ``ToolError``, ``hang_tool`` never returns."""
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

    return registry


def script_runtime(book: ScriptBook, config: Any, *, max_steps: int = 16) -> Runtime:
    """A runtime whose only agent is the tool-calling loop over the book's scripted model."""
    return Runtime(
        config,
        agents={"scripted": tool_calling_agent(max_steps=max_steps)},
        tools=script_tools(),
        llm=ScriptedLLMProvider(book.turn),
    )


def check_run_against_script(
    script: AgentScript, run: Sequence[Mapping[str, Any]], outcome: str | None
) -> None:
    """Assert that one run's events are what ``script`` asks for, given the cancel outcome.

    ``outcome`` is the ``CancelOutcome.state`` of the cancel sent after event
    ``script.cancel_after`` (``None`` when no cancel was sent).
    """
    assert run, "the run has no events"
    assert run[0]["type"] == "agent_started", types_of(run)
    terminal = run[-1]
    assert terminal["type"] in TERMINAL_EVENTS, types_of(run)
    assert all(f["type"] not in TERMINAL_EVENTS for f in run[:-1]), types_of(run)
    assert outcome in (None, "active", "not_found"), outcome

    expected = script.expected_tokens()
    actual = event_tokens(run[1:-1])
    complete = actual == expected
    kinds = script.calls()

    for frame in of_type(run, "agent_thinking"):
        turn = int(frame["data"]["reasoning"][1:].split(".")[0])
        assert frame["data"]["step"] == turn, frame
    for frame in of_type(run, "tool_executing"):
        assert frame["data"]["call_id"] in kinds, frame

    # When each tool call ended: before the cancel was sent, or possibly after it.
    position = {id(f): i for i, f in enumerate(run)}
    cancel_sent_at = script.cancel_after if outcome is not None else None
    for frame in of_type(run, "tool_completed"):
        data = frame["data"]
        kind = kinds[data["call_id"]]
        assert data["tool_name"] == f"{kind}_tool"
        allowed = {EXPECTED_STATUS[kind]}
        completed_after_cancel = (
            cancel_sent_at is not None and position[id(frame)] >= cancel_sent_at
        )
        if outcome == "active" and completed_after_cancel:
            allowed.add("cancelled")
        assert data["status"] in allowed, (data, outcome, script)
        if data["status"] == "cancelled":
            assert data["error"]["type"] == "cancelled"
        elif data["status"] != "ok":
            assert data["error"]["type"] == EXPECTED_ERROR_TYPE[kind]
        else:
            value = data_value(frame, run)
            assert data["results"] == {"value": value, "double": 2 * value}

    if terminal["type"] == "agent_cancelled":
        assert outcome == "active", (outcome, types_of(run))
        assert terminal["data"]["reason"] == "client"
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

    # Not cancelled: the whole script ran, and it ended with the answer.
    assert terminal["type"] == "agent_completed", (terminal, script)
    assert complete, (actual, expected)
    assert terminal["data"]["final_response"] == script.final_response()
    assert all(f["data"]["status"] != "cancelled" for f in of_type(run, "tool_completed"))
    # A cancel answered 'active' is never followed by a success.
    assert outcome in (None, "not_found"), ("an 'active' cancel ended agent_completed", script)


def check_cancel_timing(
    script: AgentScript,
    run: Sequence[Mapping[str, Any]],
    times: Sequence[float],
    cancel_time: float | None,
) -> None:
    """Assert when things happened (virtual time; only hanging tools take time).

    A hanging call that timed out ran its full timeout and ended no later than the
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
        if data["status"] == "timeout":
            assert kinds[data["call_id"]] == "hang"
            assert at - started_at[data["call_id"]] >= HANG_TIMEOUT, (at, started_at, data)
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

tool_kinds: st.SearchStrategy[ToolKind] = st.sampled_from(("ok", "fail", "hang"))


@attrs.frozen
class _Thinking:
    chunks: int


@attrs.frozen
class _Tools:
    kinds: tuple[ToolKind, ...]


def thinking_steps() -> st.SearchStrategy[_Thinking]:
    return st.builds(_Thinking, st.integers(min_value=1, max_value=3))


def tool_steps() -> st.SearchStrategy[_Tools]:
    """One tool call, or 2-3 parallel ones."""
    single = tool_kinds.map(lambda kind: _Tools((kind,)))
    parallel = st.lists(tool_kinds, min_size=2, max_size=3).map(lambda ks: _Tools(tuple(ks)))
    return st.one_of(single, parallel)


@st.composite
def agent_scripts(
    draw: st.DrawFn,
    *,
    max_steps: int = 6,
    cancel: bool = True,
) -> AgentScript:
    """Thinking and tool steps in any order, then an answer of 0-4 chunks; maybe a cancel point."""
    steps = draw(st.lists(st.one_of(thinking_steps(), tool_steps()), max_size=max_steps))
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
    cancel_after = None
    if cancel:
        points = st.none() | st.integers(min_value=1, max_value=script.expected_event_count())
        if script.tool_group_starts():
            points |= st.sampled_from(script.tool_group_starts())
        cancel_after = draw(points)
    return attrs.evolve(script, cancel_after=cancel_after)
