"""Every message the actors of a session exchange, in one place.

Actors share no mutable state: they talk only by sending these frozen attrs
instances through trio memory channels. Each class's docstring names who
sends it and what answers it. A request that needs an answer carries its own
reply channel of capacity 1 (excluded from equality); the answering actor uses
``send_nowait`` on it, so answering never blocks and no cycle of bounded
channels can deadlock.

Flow (see docs/architecture.md)::

    connection actor --StartRun/CancelRun--> agent actor --spawns--> run task
    run task --ExecuteTool/CancelToolCall--> tool-executor actor --ToolResult--> run task
    run task, tool executor, agent actor --EmitEvent--> sequencer --> window --> connections
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import trio

from ._trace import UnifiedTraceContext

# --- values ---------------------------------------------------------------------------------

ToolStatus = Literal["ok", "error", "timeout", "cancelled"]
#: What happens to a ``user_message`` for a thread that has an active run.
ThreadPolicy = Literal["enqueue", "reject", "interrupt"]
THREAD_POLICIES: frozenset[str] = frozenset({"enqueue", "reject", "interrupt"})


@attrs.frozen
class ErrorInfo:
    """A typed failure as it appears on the wire: ``{"type": ..., "message": ...}``."""

    type: str
    message: str

    def to_wire(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


@attrs.frozen
class ToolCall:
    """One tool call proposed by the LLM (or by agent code): a call id, a tool, its arguments."""

    call_id: str
    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict)
    #: Why the model's arguments could not be used (not JSON, not an object), if so.
    invalid_arguments: str | None = None


@attrs.frozen
class ToolResult:
    """The outcome of one tool call. Sent by the tool-executor actor on the call's reply channel.

    ``results`` is the tool's JSON-serialisable return value when ``status`` is
    ``"ok"``; otherwise ``error`` says why.
    """

    call_id: str
    tool_name: str
    status: ToolStatus
    results: Any = None
    error: ErrorInfo | None = None
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --- agent actor inbox ----------------------------------------------------------------------


@attrs.frozen
class RunAdmission:
    """Reply to ``StartRun``: whether the run was queued or started, or why it was refused.

    ``code`` of a refusal is an error code of the protocol: ``busy`` (policy
    ``reject`` and the thread has an active run), ``limit_exceeded`` (the
    thread's queue is full) or ``unavailable`` (the session is closing).
    """

    run_id: str
    thread_id: str
    accepted: bool
    code: str | None = None
    message: str | None = None


@attrs.frozen
class StartRun:
    """Start (or queue) a run. Sent by a connection actor or the in-process API to the agent actor.

    Answered by a ``RunAdmission`` on ``reply`` (when given). Runs of one thread
    execute one after another in arrival order; runs of different threads
    concurrently.
    """

    run_id: str
    user_id: str
    thread_id: str
    text: str
    agent_name: str
    trace: UnifiedTraceContext
    client_msg_id: str | None = None
    policy: ThreadPolicy = "enqueue"
    reply: trio.MemorySendChannel[RunAdmission] | None = attrs.field(default=None, eq=False)


@attrs.frozen
class CancelOutcome:
    """Reply to ``CancelRun``: ``state`` is ``"queued"``, ``"active"`` or ``"not_found"``."""

    run_id: str
    state: Literal["queued", "active", "not_found"]


@attrs.frozen
class CancelRun:
    """Cancel a queued or active run. Sent to the agent actor; answered by a ``CancelOutcome``.

    A queued run is dropped with a lone ``agent_cancelled``; an active run's
    cancel scope is cancelled, its tools end with ``tool_completed`` status
    ``cancelled``, then ``agent_cancelled`` with ``reason``.
    """

    run_id: str
    reason: str = "client"
    reply: trio.MemorySendChannel[CancelOutcome] | None = attrs.field(default=None, eq=False)


@attrs.frozen
class CancelAllRuns:
    """Cancel every queued and active run of the session (shutdown). Sent to the agent actor."""

    reason: str = "shutdown"


@attrs.frozen
class RunFinished:
    """A run task has emitted its terminal event. Sent by the run task to the agent actor."""

    run_id: str
    thread_id: str


AgentInbox = StartRun | CancelRun | CancelAllRuns | RunFinished

# --- tool-executor actor inbox --------------------------------------------------------------


@attrs.frozen
class ExecuteTool:
    """Run one tool call. Sent by a run task to the tool-executor actor.

    Answered by exactly one ``ToolResult`` on ``reply`` after the executor has
    emitted ``tool_executing`` and ``tool_completed`` for the call.
    """

    run_id: str
    thread_id: str
    call: ToolCall
    trace: UnifiedTraceContext
    reply: trio.MemorySendChannel[ToolResult] = attrs.field(eq=False)


@attrs.frozen
class CancelToolCall:
    """Cancel an executing tool call. Sent by a run task that is being cancelled.

    The original ``ExecuteTool`` is then answered with status ``cancelled``
    (unless the tool had already finished). Calls are keyed by run and call id:
    models reuse call ids across runs.
    """

    run_id: str
    call_id: str


ToolInbox = ExecuteTool | CancelToolCall

# --- sequencer inbox ------------------------------------------------------------------------


@attrs.frozen
class EmitEvent:
    """An unstamped lifecycle event. Sent by run tasks, the tool executor and the agent actor.

    The sequencer answers nothing: it stamps ``seq`` and ``ts``, encodes the
    frame once and appends it to the session's window, in arrival order.
    """

    type: str
    run_id: str
    thread_id: str
    trace: UnifiedTraceContext
    data: Mapping[str, Any]


@attrs.frozen
class Event:
    """A stamped event as every connection of the session receives it.

    ``frame`` is the JSON text sent on the wire, encoded once by the sequencer.
    """

    seq: int
    type: str
    run_id: str
    thread_id: str
    ts: float
    trace_id: str
    span_id: str
    data: Mapping[str, Any]
    frame: str = attrs.field(eq=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


TERMINAL_EVENTS = frozenset({"agent_completed", "agent_error", "agent_cancelled"})

# --- parsed client frames (connection actor) -------------------------------------------------


@attrs.frozen
class UserMessage:
    """A client's ``user_message`` frame, validated."""

    text: str
    thread_id: str = "main"
    client_msg_id: str | None = None
    traceparent: str | None = None
    policy: ThreadPolicy | None = None


@attrs.frozen
class CancelRequest:
    """A client's ``cancel`` frame, validated."""

    run_id: str
    client_msg_id: str | None = None


@attrs.frozen
class ResumeRequest:
    """A client's ``resume`` frame: restart this connection's stream after ``after_seq``."""

    after_seq: int
    session_id: str | None = None
    client_msg_id: str | None = None


@attrs.frozen
class Ping:
    """A client's ``ping`` frame."""


ClientMessage = UserMessage | CancelRequest | ResumeRequest | Ping
