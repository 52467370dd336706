"""A user's session: a supervised actor nursery.

Actors of one session (all children of ``Session.run``'s nursery)::

    sequencer       stamps, encodes and publishes every event of the session
    agent actor     admits, queues, starts and cancels runs; one task per active run
    tool executor   runs tool calls and emits their events
    connections     one actor per open WebSocket (reader + writer tasks)

They share no mutable state and talk through memory channels (messages in
``_messages``). A fault in one run becomes that run's ``agent_error``; a fault
in one connection closes that connection; neither touches the session's other
runs and connections, nor any other session.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import attrs
import trio

from ._agents import Agent
from ._bridge import AgentWebSocketBridge
from ._exceptions import AgentError, RuntimeClosed
from ._llm import LLMManager
from ._messages import (
    AgentInbox,
    CancelAllRuns,
    CancelOutcome,
    CancelRun,
    EmitEvent,
    ErrorInfo,
    RunAdmission,
    RunFinished,
    StartRun,
    ToolInbox,
)
from ._sequencer import EventStore, SessionSequencer, Subscription
from ._tools import UnifiedToolExecutionEngine, run_tool_executor

INBOX_CAPACITY = 64
_T = TypeVar("_T")
EVENT_INBOX_CAPACITY = 256


@attrs.define
class SessionServices:
    """What every session of a runtime shares, all read-only while runs execute."""

    agents: Mapping[str, Agent]
    default_agent: str
    engine: UnifiedToolExecutionEngine
    llm: LLMManager
    window_events: int = 10_000
    store: EventStore | None = None
    terminal_grace: float = 5.0


@attrs.frozen
class SessionStatistics:
    """A snapshot of one session."""

    session_id: str
    user_id: str
    last_seq: int
    active_runs: int
    queued_runs: int
    connections: int
    window_events: int


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaf_errors(sub)]
    return [exc]


def classify_agent_failure(exc: BaseException) -> ErrorInfo | None:
    """The ``agent_error`` payload for an exception out of agent code.

    ``None`` when the exception is only cancellation (which is reported as
    ``agent_cancelled``, never as an error).
    """
    leaves = [e for e in _leaf_errors(exc) if not isinstance(e, trio.Cancelled)]
    if not leaves:
        return None
    first = leaves[0]
    if isinstance(first, AgentError):
        return ErrorInfo(first.error_type, str(first) or type(first).__name__)
    if isinstance(first, Exception):
        return ErrorInfo("agent_error", f"{type(first).__name__}: {first}")
    return ErrorInfo("internal", f"{type(first).__name__}: {first}")


class _RunControl:
    """The agent actor's handle on one of its active runs (owned by the agent actor)."""

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        self.scope = trio.CancelScope()
        self.reason = "client"

    def cancel(self, reason: str) -> None:
        if not self.scope.cancel_called:
            self.reason = reason
            self.scope.cancel()


class Session:
    """One user's event stream and actors. Created and supervised by the runtime.

    Public methods are safe to call from any task of the runtime: they only
    send messages to the session's actors and wait for their answers.
    """

    def __init__(
        self,
        user_id: str,
        services: SessionServices,
        *,
        session_id: str | None = None,
        on_closed: Callable[[Session], None] | None = None,
    ) -> None:
        self.user_id = user_id
        self.session_id = session_id or "sess_" + uuid.uuid4().hex
        self._services = services
        self._on_closed = on_closed
        self.sequencer = SessionSequencer(
            self.session_id, window_events=services.window_events, store=services.store
        )
        self._emit_send, self._emit_recv = trio.open_memory_channel[EmitEvent](EVENT_INBOX_CAPACITY)
        self._agent_send, self._agent_recv = trio.open_memory_channel[AgentInbox](INBOX_CAPACITY)
        self._tool_send, self._tool_recv = trio.open_memory_channel[ToolInbox](INBOX_CAPACITY)
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()
        self._closed = trio.Event()
        self._runs_done = trio.Event()
        self.closing = False
        # Counts kept by the agent actor for statistics() only.
        self._active = 0
        self._queued = 0
        self.connections = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session's supervisor: runs every actor until ``aclose`` or cancellation."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.sequencer.run, self._emit_recv)
                nursery.start_soon(
                    run_tool_executor,
                    self._services.engine,
                    self._tool_recv,
                    self._emit_send.clone(),
                )
                nursery.start_soon(self._agent_actor, self._agent_recv, self._emit_send.clone())
                self._ready.set()
                task_status.started()
        finally:
            self.closing = True
            self._closed.set()
            if self._on_closed is not None:
                self._on_closed(self)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def aclose(self, grace: float | None = None) -> None:
        """End the session: cancel its runs (reason ``shutdown``) and close its actors.

        Runs get ``grace`` seconds to emit their terminal events; connections are
        sent every event up to the last one and then closed with 1001. After the
        grace period whatever is left is cancelled.
        """
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        grace = self._services.terminal_grace if grace is None else grace
        with trio.move_on_after(grace) as scope:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._agent_send.send(CancelAllRuns("shutdown"))
            await self._runs_done.wait()
            # Each actor closes its own clone of the event channel when it ends; once
            # these originals are closed too, the sequencer ends after the last event
            # and connection writers flush everything and close with 1001.
            await self._agent_send.aclose()
            await self._tool_send.aclose()
            await self._emit_send.aclose()
            await self._closed.wait()
        if scope.cancelled_caught and self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._closed.wait()

    # -- requests from connections and the in-process API ---------------------------------

    async def start_run(
        self,
        text: str,
        *,
        thread_id: str = "main",
        agent: str | None = None,
        client_msg_id: str | None = None,
        trace: Any = None,
        run_id: str | None = None,
    ) -> RunAdmission:
        """Queue or start a run; returns when the agent actor has admitted it.

        Raises:
            RuntimeClosed: the session is closing.
        """
        from ._trace import UnifiedTraceContext

        reply_send, reply_recv = trio.open_memory_channel[RunAdmission](1)
        message = StartRun(
            run_id=run_id or "run_" + uuid.uuid4().hex,
            user_id=self.user_id,
            thread_id=thread_id,
            text=text,
            agent_name=agent or self._services.default_agent,
            trace=trace if trace is not None else UnifiedTraceContext.new_root(),
            client_msg_id=client_msg_id,
            reply=reply_send,
        )
        return await self._request(message, reply_recv)

    async def cancel_run(self, run_id: str, reason: str = "client") -> CancelOutcome:
        """Cancel a queued or active run; says which it was, or ``not_found``."""
        reply_send, reply_recv = trio.open_memory_channel[CancelOutcome](1)
        return await self._request(CancelRun(run_id, reason, reply_send), reply_recv)

    async def _request(self, message: AgentInbox, reply: trio.MemoryReceiveChannel[_T]) -> _T:
        if self.closing:
            raise RuntimeClosed(f"session {self.session_id} is closing")
        try:
            await self._agent_send.send(message)
            return await reply.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            raise RuntimeClosed(f"session {self.session_id} is closing") from None

    def subscribe(self, after_seq: int | None = None) -> Subscription:
        """A cursor into the session's events (default: from the newest event on)."""
        return self.sequencer.subscribe(after_seq)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start a child actor in the session's nursery (connection actors)."""
        if self._nursery is None or self.closing:
            raise RuntimeClosed(f"session {self.session_id} is closing")
        self._nursery.start_soon(fn, *args)

    def statistics(self) -> SessionStatistics:
        seq = self.sequencer.statistics()
        return SessionStatistics(
            session_id=self.session_id,
            user_id=self.user_id,
            last_seq=seq.last_seq,
            active_runs=self._active,
            queued_runs=self._queued,
            connections=self.connections,
            window_events=seq.window_events,
        )

    # -- the agent actor ------------------------------------------------------------------

    async def _agent_actor(
        self, inbox: trio.MemoryReceiveChannel[AgentInbox], emit: trio.MemorySendChannel[EmitEvent]
    ) -> None:
        """Admits runs, keeps per-thread FIFO queues, starts runs, cancels them.

        Only this task reads or writes the queues and the active-run table, so
        admission and cancellation decisions are free of check-then-act races.
        Run tasks report their end with ``RunFinished`` on the same inbox; this
        actor only ever blocks on the sequencer's inbox (which never waits for
        it) and answers requests with ``send_nowait``, so no cycle can deadlock.
        Ends after ``CancelAllRuns`` once every run has finished.
        """
        queues: dict[str, deque[StartRun]] = {}
        active: dict[str, _RunControl] = {}
        closing = False

        async def cancel_queued(start: StartRun, reason: str) -> None:
            await emit.send(
                EmitEvent(
                    "agent_cancelled",
                    start.run_id,
                    start.thread_id,
                    start.trace,
                    {"reason": reason},
                )
            )

        def begin(nursery: trio.Nursery, message: StartRun) -> None:
            control = _RunControl(message.thread_id)
            active[message.run_id] = control
            nursery.start_soon(
                self._execute_run, message, control, emit.clone(), self._agent_send.clone()
            )

        async with inbox, emit, trio.open_nursery() as nursery:
            async for message in inbox:
                match message:
                    case StartRun():
                        if closing:
                            admission = RunAdmission(
                                message.run_id,
                                message.thread_id,
                                False,
                                "shutdown",
                                "session is closing",
                            )
                        else:
                            busy = any(c.thread_id == message.thread_id for c in active.values())
                            if busy:
                                queues.setdefault(message.thread_id, deque()).append(message)
                            else:
                                begin(nursery, message)
                            admission = RunAdmission(message.run_id, message.thread_id, True)
                        if message.reply is not None:
                            message.reply.send_nowait(admission)
                    case CancelRun(run_id=run_id, reason=reason):
                        state: Literal["queued", "active", "not_found"] = "not_found"
                        if run_id in active:
                            active[run_id].cancel(reason)
                            state = "active"
                        else:
                            for queue in queues.values():
                                found = next((s for s in queue if s.run_id == run_id), None)
                                if found is not None:
                                    queue.remove(found)
                                    await cancel_queued(found, reason)
                                    state = "queued"
                                    break
                        if message.reply is not None:
                            message.reply.send_nowait(CancelOutcome(run_id, state))
                    case CancelAllRuns(reason=reason):
                        closing = True
                        for queue in queues.values():
                            while queue:
                                await cancel_queued(queue.popleft(), reason)
                        queues.clear()
                        for control in active.values():
                            control.cancel(reason)
                    case RunFinished(run_id=run_id, thread_id=thread_id):
                        active.pop(run_id, None)
                        waiting = queues.get(thread_id)
                        if waiting:
                            begin(nursery, waiting.popleft())
                        if not waiting:
                            queues.pop(thread_id, None)
                self._active = len(active)
                self._queued = sum(len(q) for q in queues.values())
                if closing and not active:
                    break
        self._runs_done.set()

    # -- one run ---------------------------------------------------------------------------

    async def _execute_run(
        self,
        start: StartRun,
        control: _RunControl,
        emit: trio.MemorySendChannel[EmitEvent],
        finished: trio.MemorySendChannel[AgentInbox],
    ) -> None:
        """Run the agent inside the run's cancel scope and emit its lifecycle events.

        ``agent_started`` first; the terminal event after the agent and every
        task it started have finished (so after every ``tool_completed``).
        Cancellation from outside the run (the session torn down) still emits
        ``agent_cancelled`` (reason ``shutdown``), shielded for a short grace.
        """
        services = self._services

        def event(kind: str, data: dict[str, Any]) -> EmitEvent:
            return EmitEvent(kind, start.run_id, start.thread_id, start.trace, data)

        async with emit, finished:
            terminal: EmitEvent | None = None
            try:
                started: dict[str, Any] = {
                    "agent_name": start.agent_name,
                    "user_id": start.user_id,
                    "text": start.text,
                }
                if start.client_msg_id is not None:
                    started["client_msg_id"] = start.client_msg_id
                await emit.send(event("agent_started", started))
                final: str | None = None
                error: ErrorInfo | None = None
                with control.scope:
                    try:
                        agent = services.agents.get(start.agent_name)
                        if agent is None:
                            raise AgentError(f"no agent named {start.agent_name!r}")
                        bridge = AgentWebSocketBridge(
                            start,
                            emit=emit,
                            tools=self._tool_send,
                            llm=services.llm,
                            tool_specs=services.engine.registry.specs,
                        )
                        final = await agent(bridge)
                        if not isinstance(final, str):
                            final = "" if final is None else str(final)
                    except BaseException as exc:
                        error = classify_agent_failure(exc)
                        if error is None:
                            raise
                if control.scope.cancelled_caught:
                    terminal = event("agent_cancelled", {"reason": control.reason})
                elif error is not None:
                    terminal = event("agent_error", {"error": error.to_wire()})
                else:
                    terminal = event("agent_completed", {"status": "ok", "final_response": final})
            except BaseException as exc:
                if classify_agent_failure(exc) is not None:
                    raise  # not ours: a bug in the runtime itself; let the session see it
                terminal = event("agent_cancelled", {"reason": "shutdown"})
                raise
            finally:
                with trio.CancelScope(shield=True) as shield:
                    shield.deadline = trio.current_time() + services.terminal_grace
                    try:
                        if terminal is not None:
                            await emit.send(terminal)
                        await finished.send(RunFinished(start.run_id, start.thread_id))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
