"""A user's session: a supervised actor nursery.

Actors of one session (all children of ``Session.run``'s nursery)::

    sequencer       stamps, encodes and publishes every event of the session
    agent actor     admits, queues, starts and cancels runs; one task per active run
    tool executor   runs tool calls and emits their events
    connections     one actor per open WebSocket (reader + writer tasks)
    idle watch      closes the session once it has been idle for the grace period

They share no mutable state and talk through memory channels (messages in
``_messages``). A fault in one run becomes that run's ``agent_error``; a fault
in one connection closes that connection; neither touches the session's other
runs and connections, nor any other session.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, TypeVar

import attrs
import trio

from ._agents import Agent
from ._bridge import AgentWebSocketBridge
from ._config import Config
from ._conversations import ConversationStore
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
    ThreadPolicy,
    ToolInbox,
)
from ._sequencer import Emitter, EventStore, SessionSequencer, Subscription
from ._store import RunStore, StoredRun, StoreError
from ._telemetry import Telemetry
from ._tools import UnifiedToolExecutionEngine, run_tool_executor
from ._trace import UnifiedTraceContext
from ._tracker import ExecutionTracker

logger = logging.getLogger("netra_actors.session")

INBOX_CAPACITY = 64
_T = TypeVar("_T")


@attrs.define
class SessionServices:
    """What every session of a runtime shares, all read-only while runs execute."""

    agents: Mapping[str, Agent]
    default_agent: str
    engine: UnifiedToolExecutionEngine
    llm: LLMManager
    config: Config = attrs.field(factory=Config)
    store: EventStore | None = None
    #: ``store`` when it is a full ``RunStore`` (checked once: a runtime-checkable
    #: isinstance costs tens of microseconds, too much for every admission).
    run_store: RunStore | None = None
    conversations: ConversationStore | None = None
    telemetry: Telemetry = attrs.field(factory=Telemetry)
    tracker: ExecutionTracker = attrs.field(factory=ExecutionTracker)
    #: Run deadlines by agent name, overriding ``config.run_timeout``.
    run_timeouts: Mapping[str, float | None] = attrs.field(factory=dict)
    #: Watches every run's stall limit (its ``run`` is a task of the runtime).
    stall_watch: StallWatch = attrs.field(factory=lambda: StallWatch())


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
    subscriptions: int
    paced_waits: int


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


class RateLimiter:
    """A token bucket: ``rate`` frames per second sustained, ``burst`` at once.

    One per session (the user's frames across all their connections). It is
    only ever touched synchronously from the session's own trio thread.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at: float | None = None

    def allow(self) -> bool:
        """Take one token; ``False`` when the user is over the rate."""
        now = trio.current_time()
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class _RunControl:
    """The agent actor's handle on one of its active runs (owned by the agent actor)."""

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        self.scope = trio.CancelScope()
        self.reason = "client"
        #: Set by the run task, in the same step as it chooses its terminal event.
        self.decided = False

    def cancel(self, reason: str) -> bool:
        """Cancel the run unless it has already chosen its terminal event.

        Returns whether the run will end ``agent_cancelled``. Both this and the
        run's decision are synchronous steps of one trio thread, so a cancel
        answered ``active`` is always reported as ``agent_cancelled``.
        """
        if self.decided:
            return False
        if not self.scope.cancel_called:
            self.reason = reason
            self.scope.cancel()
        return True


class _RunLimits:
    """A run's deadline (``timeout`` seconds from its start) and stall limit (``stall``
    seconds without an event or a tool result). Either ends the agent by cancelling it
    (its tools get ``tool_completed`` cancelled as on any cancel) and sets ``exceeded``.
    Stalls are watched by the runtime's ``StallWatch``, not by a task of the run's own."""

    __slots__ = ("_watch", "bridge", "exceeded", "scope", "stall", "timeout")

    def __init__(self, timeout: float | None, stall: float | None, watch: StallWatch) -> None:
        self.timeout = timeout
        self.stall = stall
        self.scope = trio.CancelScope()
        self.exceeded: ErrorInfo | None = None
        self.bridge: AgentWebSocketBridge | None = None
        self._watch = watch

    async def run(self, agent: Agent, bridge: AgentWebSocketBridge) -> str | None:
        if self.timeout is not None:
            self.scope.deadline = trio.current_time() + self.timeout
        result: str | None = None
        with self.scope:
            if self.stall is None:
                result = await agent(bridge)
            else:
                self.bridge = bridge
                self._watch.add(self)
                try:
                    result = await agent(bridge)
                finally:
                    self._watch.discard(self)
        if self.scope.cancel_called and self.exceeded is None:
            self.exceeded = ErrorInfo(
                "timeout", f"the run exceeded its {self.timeout:g} s deadline"
            )
        return result

    def due(self) -> float:
        """When the run counts as stalled if it makes no more progress."""
        assert self.bridge is not None
        assert self.stall is not None
        return self.bridge.last_progress + self.stall

    def stalled(self) -> None:
        self.exceeded = ErrorInfo(
            "timeout", f"the run made no progress for {self.stall:g} s (stalled)"
        )
        self.scope.cancel()


class StallWatch:
    """Ends the runs of a runtime that make no progress for their stall limit.

    One task for every run: it sleeps until the earliest moment a watched run
    could have stalled, then looks at each run's last progress, cancels the
    stalled ones and sleeps again. A run costs an entry in a set, not a task,
    a nursery and a timer of its own. Runs register for as long as their agent
    runs (``add`` / ``discard``, synchronous). Cancelling ``run`` stops watching.
    """

    def __init__(self) -> None:
        self._runs: set[_RunLimits] = set()
        self._sleep: trio.CancelScope | None = None

    def add(self, limits: _RunLimits) -> None:
        self._runs.add(limits)
        due, sleep = limits.due(), self._sleep
        if sleep is not None and due < sleep.deadline:
            sleep.deadline = due

    def discard(self, limits: _RunLimits) -> None:
        self._runs.discard(limits)
        if not self._runs and self._sleep is not None:
            self._sleep.deadline = math.inf  # nothing to watch: no timer left behind

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            wake = math.inf
            for limits in list(self._runs):
                due = limits.due()
                if now >= due:
                    self._runs.discard(limits)
                    limits.stalled()
                else:
                    wake = min(wake, due)
            with trio.CancelScope(deadline=wake) as self._sleep:
                await trio.sleep_forever()


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
        last_seq: int = 0,
        stored_from: int | None = None,
        on_closed: Callable[[Session], None] | None = None,
    ) -> None:
        config = services.config
        self.user_id = user_id
        self.session_id = session_id or "sess_" + uuid.uuid4().hex
        self._services = services
        self._on_closed = on_closed
        self.sequencer = SessionSequencer(
            self.session_id,
            window_events=config.window_events,
            window_max_age=config.window_max_age,
            store=services.store,
            last_seq=last_seq,
            stored_from=stored_from,
            observers=[partial(services.tracker.observe, self.session_id, user_id)],
            linger=config.write_linger,
            on_end=self._changed,
            on_failure=self._store_failed,
        )
        self.rate_limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self._emit_send = self.sequencer.sender()
        # The actors' inboxes, made by _start_actors with the actors.
        self._agent_send: trio.MemorySendChannel[AgentInbox]
        self._tool_send: trio.MemorySendChannel[ToolInbox]
        self._nursery: trio.Nursery | None = None
        self._ready: trio.Event | None = trio.Event()  # dropped once the session is ready
        self._closed = trio.Event()
        self._runs_done: trio.Event  # made with the actors (see _start_actors)
        #: Whether the agent actor and the tool executor run (started by the first request).
        self._actors_started = False
        self._state_changed = trio.Event()
        self._idle_since = 0.0  # when the session last became idle (trio time)
        self._was_idle = True
        self._idle_watching = False
        self.closing = False
        # Written by their owning actors, read by statistics() and the idle watch.
        self._active = 0
        self._queued = 0
        self._connections = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session's supervisor: runs every actor until the session closes.

        Cancelling it cancels every actor at once (runs still try to emit their
        ``agent_cancelled``).
        """
        try:
            # The nursery is opened here, not in a helper coroutine: a session waits in
            # this frame for its whole life, and each frame waiting is memory per session.
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.sequencer.needs_task:
                    nursery.start_soon(self._run_sequencer)
                self._idle_since = trio.current_time()
                self._watch_idle()
                ready, self._ready = self._ready, None
                if ready is not None:
                    ready.set()
                task_status.started()
        except* Exception:
            # A fault in the session's own machinery (not in agent or tool code,
            # which become events) ends this session only, never the runtime.
            logger.exception("session %s of %r crashed", self.session_id, self.user_id)
        finally:
            self.closing = True
            self._closed.set()
            if self._on_closed is not None:
                self._on_closed(self)

    def _start_actors(self) -> None:
        """Start the agent actor and the tool executor (on the first request: a session
        that only ever has connections, such as an idle tab, costs two tasks less)."""
        if self._actors_started:
            return
        assert self._nursery is not None
        self._actors_started = True
        self._runs_done = trio.Event()
        self._agent_send, agent_recv = trio.open_memory_channel[AgentInbox](INBOX_CAPACITY)
        self._tool_send, tool_recv = trio.open_memory_channel[ToolInbox](INBOX_CAPACITY)
        self._nursery.start_soon(
            partial(
                run_tool_executor,
                cancel_grace=self._services.config.tool_cancel_grace,
                max_concurrent=self._services.config.max_session_tools,
            ),
            self._services.engine,
            tool_recv,
            self._emit_send.clone(),
        )
        self._nursery.start_soon(self._agent_actor, agent_recv, self._emit_send.clone())

    async def _run_sequencer(self) -> None:
        try:
            await self.sequencer.run()
        finally:
            self._changed()

    def _store_failed(self, error: BaseException) -> None:
        """The store refused a batch: the session's stream cannot go on; end the session."""
        logger.error(
            "session %s of %r: storing events failed: %s", self.session_id, self.user_id, error
        )
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def wait_ready(self) -> None:
        if self._ready is None:
            await trio.lowlevel.checkpoint()
        else:
            await self._ready.wait()

    async def wait_closed(self) -> None:
        """Wait until the session has ended (closed, idle teardown, or crashed)."""
        await self._closed.wait()

    @property
    def idle(self) -> bool:
        """No connection, no active and no queued run."""
        return self._connections == 0 and self._active == 0 and self._queued == 0

    def _changed(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()
        idle = self.idle
        if idle and not self._was_idle:
            self._idle_since = trio.current_time()
        self._was_idle = idle
        if idle:
            self._watch_idle()

    def _watch_idle(self) -> None:
        """Start the idle watch if the session is idle and none runs (it exists only
        while the session is idle: a session in use keeps no task for it)."""
        if not self._idle_watching and not self.closing and self._nursery is not None:
            try:
                self._nursery.start_soon(self._idle_watch)
            except RuntimeError:
                return  # the nursery is closed: the session has ended
            self._idle_watching = True

    async def aclose(self, grace: float | None = None) -> None:
        """End the session: cancel its runs (reason ``shutdown``) and close its actors.

        Queued runs get a lone ``agent_cancelled``; active runs get ``grace``
        seconds to emit their terminal events; connections are sent every event
        up to the last one and then closed with 1001. After the grace period
        whatever is left is cancelled.
        """
        if not self.closing:
            await self._close(self._services.config.shutdown_grace if grace is None else grace)
        await self._closed.wait()

    async def _close(self, grace: float) -> None:
        self.closing = True
        self._changed()
        with trio.move_on_after(grace) as scope:
            if self._actors_started:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._agent_send.send(CancelAllRuns("shutdown"))
                await self._runs_done.wait()
            # Each actor closes its own clone of the event channel when it ends; once
            # these originals are closed too, the sequencer ends after the last event
            # and connection writers flush everything and close with 1001.
            if self._actors_started:
                await self._agent_send.aclose()
                await self._tool_send.aclose()
            await self._emit_send.aclose()
            await self.sequencer.wait_finished()
            # Not self._closed: this may run inside the session's own nursery.
            while self._connections:
                await self._state_changed.wait()
        if scope.cancelled_caught and self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _idle_watch(self) -> None:
        """Close the session once it has stayed idle for ``idle_session_grace`` seconds
        (counted from the moment it last became idle).

        Ends as soon as the session is in use again or starts closing.
        """
        grace = self._services.config.idle_session_grace
        try:
            while self.idle and not self.closing:
                deadline = self._idle_since + grace
                if trio.current_time() >= deadline:
                    # Started as a sibling, not awaited here: the close waits for this
                    # nursery, which waits for this task.
                    assert self._nursery is not None
                    self._nursery.start_soon(self._close, self._services.config.shutdown_grace)
                    return
                with trio.move_on_at(deadline):
                    await self._state_changed.wait()
        finally:
            self._idle_watching = False

    # -- connections ----------------------------------------------------------------------

    def connection_opened(self) -> None:
        self._connections += 1
        self._changed()

    def connection_closed(self) -> None:
        self._connections -= 1
        self._changed()

    @property
    def connections(self) -> int:
        return self._connections

    # -- requests from connections and the in-process API ---------------------------------

    async def start_run(
        self,
        text: str,
        *,
        thread_id: str = "main",
        agent: str | None = None,
        client_msg_id: str | None = None,
        trace: UnifiedTraceContext | None = None,
        run_id: str | None = None,
        policy: ThreadPolicy | None = None,
    ) -> RunAdmission:
        """Queue or start a run; returns when the agent actor has admitted or refused it.

        ``policy`` (default: the configured ``thread_policy``) says what happens
        when the thread already has a run: ``enqueue``, ``reject`` or ``interrupt``.

        Raises:
            RuntimeClosed: the session is closing.
        """
        reply_send, reply_recv = trio.open_memory_channel[RunAdmission](1)
        message = StartRun(
            run_id=run_id or "run_" + uuid.uuid4().hex,
            user_id=self.user_id,
            thread_id=thread_id,
            text=text,
            agent_name=agent or self._services.default_agent,
            trace=trace if trace is not None else UnifiedTraceContext.new_root(),
            client_msg_id=client_msg_id,
            policy=policy or self._services.config.thread_policy,  # type: ignore[arg-type]
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
        self._start_actors()
        try:
            await self._agent_send.send(message)
            return await reply.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            raise RuntimeClosed(f"session {self.session_id} is closing") from None

    def subscribe(self, after_seq: int | None = None, *, paces: bool = True) -> Subscription:
        """A cursor into the session's events (default: from the newest event on)."""
        return self.sequencer.subscribe(after_seq, paces=paces)

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
            connections=self._connections,
            window_events=seq.window_events,
            subscriptions=seq.subscriptions,
            paced_waits=self.sequencer.paced_waits,
        )

    # -- the agent actor ------------------------------------------------------------------

    async def _agent_actor(
        self, inbox: trio.MemoryReceiveChannel[AgentInbox], emit: Emitter
    ) -> None:
        """Admits runs, applies the thread policies, queues, starts and cancels runs.

        Only this task reads or writes the queue and the active-run table, and it
        decides each message completely before taking the next, so admission,
        policy and cancellation decisions are free of check-then-act races. Run
        tasks report their end with ``RunFinished`` on the same inbox; this actor
        only ever blocks on the sequencer's inbox (which never waits for it) and
        answers requests with ``send_nowait``, so no cycle can deadlock. Ends
        after ``CancelAllRuns`` once every run has finished.
        """
        config = self._services.config
        pending: list[StartRun] = []  # queued runs of every thread, in arrival order
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

        def start_eligible(nursery: trio.Nursery) -> None:
            # A thread runs one run at a time; a user at most max_active_runs_per_user.
            busy = {control.thread_id for control in active.values()}
            for start in list(pending):
                if len(active) >= config.max_active_runs_per_user:
                    break
                if start.thread_id in busy:
                    continue
                pending.remove(start)
                busy.add(start.thread_id)
                control = _RunControl(start.thread_id)
                active[start.run_id] = control
                nursery.start_soon(
                    self._execute_run, start, control, emit.clone(), self._agent_send.clone()
                )

        async def admit(nursery: trio.Nursery, message: StartRun) -> RunAdmission:
            def refuse(code: str, text: str) -> RunAdmission:
                return RunAdmission(message.run_id, message.thread_id, False, code, text)

            if closing:
                return refuse("unavailable", "the session is closing")
            thread = message.thread_id
            running = [c for c in active.values() if c.thread_id == thread]
            waiting = [s for s in pending if s.thread_id == thread]
            if running or waiting:
                if message.policy == "reject":
                    return refuse("busy", f"thread {thread!r} has a run in progress")
                if message.policy == "interrupt":
                    for control in running:
                        control.cancel("interrupted")
                    for start in waiting:
                        pending.remove(start)
                        await cancel_queued(start, "interrupted")
                elif len(waiting) >= config.max_queued_per_thread:
                    return refuse(
                        "limit_exceeded",
                        f"thread {thread!r} already has {len(waiting)} queued runs",
                    )
            store = self._services.run_store
            if store is not None:
                # Before the answer: a run the client was told about is closed on restart
                # even if the process dies before it starts.
                try:
                    await store.record_queued(
                        StoredRun(
                            message.run_id,
                            self.session_id,
                            self.user_id,
                            thread,
                            "queued",
                            agent_name=message.agent_name,
                            text=message.text,
                            trace_id=message.trace.trace_id,
                            span_id=message.trace.span_id,
                            queued_at=time.time(),
                        )
                    )
                except StoreError:
                    logger.exception("recording queued run %s failed", message.run_id)
            pending.append(message)
            self._services.tracker.admitted(
                message.run_id,
                session_id=self.session_id,
                user_id=self.user_id,
                thread_id=thread,
                agent_name=message.agent_name,
                trace_id=message.trace.trace_id,
            )
            start_eligible(nursery)
            return RunAdmission(message.run_id, thread, True)

        async with inbox, emit, trio.open_nursery() as nursery:
            async for message in inbox:
                match message:
                    case StartRun():
                        admission = await admit(nursery, message)
                        if message.reply is not None:
                            message.reply.send_nowait(admission)
                    case CancelRun(run_id=run_id, reason=reason):
                        state: Literal["queued", "active", "not_found"] = "not_found"
                        queued = next((s for s in pending if s.run_id == run_id), None)
                        if run_id in active:
                            if active[run_id].cancel(reason):
                                state = "active"
                        elif queued is not None:
                            pending.remove(queued)
                            await cancel_queued(queued, reason)
                            state = "queued"
                        if message.reply is not None:
                            message.reply.send_nowait(CancelOutcome(run_id, state))
                    case CancelAllRuns(reason=reason):
                        closing = True
                        while pending:
                            await cancel_queued(pending.pop(0), reason)
                        for control in active.values():
                            control.cancel(reason)
                    case RunFinished(run_id=run_id):
                        active.pop(run_id, None)
                        start_eligible(nursery)
                self._active = len(active)
                self._queued = len(pending)
                self._changed()
                if closing and not active:
                    break
        self._runs_done.set()

    # -- one run ---------------------------------------------------------------------------

    async def _execute_run(
        self,
        start: StartRun,
        control: _RunControl,
        emit: Emitter,
        finished: trio.MemorySendChannel[AgentInbox],
    ) -> None:
        """Run the agent inside the run's cancel scope and emit its lifecycle events.

        ``agent_started`` first; the terminal event after the agent and every
        task it started have finished (so after every ``tool_completed``).
        Cancellation from outside the run (the session torn down) still emits
        ``agent_cancelled`` (reason ``shutdown``), shielded for a short grace.
        """
        services = self._services
        grace = services.config.shutdown_grace

        def event(kind: str, data: dict[str, Any]) -> EmitEvent:
            return EmitEvent(kind, start.run_id, start.thread_id, start.trace, data)

        async def emit_shielded(message: EmitEvent | RunFinished) -> None:
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = trio.current_time() + grace
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    if isinstance(message, RunFinished):
                        await finished.send(message)
                    else:
                        await emit.send(message)

        span_attributes = {
            "run_id": start.run_id,
            "thread_id": start.thread_id,
            "user_id": start.user_id,
            "session_id": self.session_id,
            "agent": start.agent_name,
        }
        with services.telemetry.span("run", start.agent_name, start.trace, span_attributes) as span:
            await self._run_body(start, control, emit, finished, event, emit_shielded, span)

    async def _run_body(
        self,
        start: StartRun,
        control: _RunControl,
        emit: Emitter,
        finished: trio.MemorySendChannel[AgentInbox],
        event: Callable[[str, dict[str, Any]], EmitEvent],
        emit_shielded: Callable[[EmitEvent | RunFinished], Any],
        span: dict[str, Any],
    ) -> None:
        services = self._services
        async with emit, finished:
            terminal_sent = False
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
                limits = _RunLimits(
                    services.run_timeouts.get(start.agent_name, services.config.run_timeout),
                    services.config.stall_timeout,
                    services.stall_watch,
                )
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
                            tool_reply_backstop=2 * services.config.tool_cancel_grace + 1,
                            conversations=services.conversations,
                        )
                        final = await limits.run(agent, bridge)
                        if not isinstance(final, str):
                            final = "" if final is None else str(final)
                    except BaseException as exc:
                        error = classify_agent_failure(exc)
                        if error is None:
                            raise
                # Decided in one synchronous step with the cancel check, see _RunControl.
                control.decided = True
                if not control.scope.cancel_called and limits.exceeded is not None:
                    error = limits.exceeded
                if control.scope.cancel_called:
                    # Even if the agent finished or swallowed the cancellation: a
                    # cancel that was accepted is never reported as success.
                    terminal = event("agent_cancelled", {"reason": control.reason})
                elif error is not None:
                    terminal = event("agent_error", {"error": error.to_wire()})
                else:
                    completed: dict[str, Any] = {"status": "ok", "final_response": final}
                    if any(bridge.usage.values()):
                        completed["usage"] = dict(bridge.usage)
                    terminal = event("agent_completed", completed)
                span["status"] = (
                    "ok"
                    if terminal.type == "agent_completed"
                    else "cancelled"
                    if terminal.type == "agent_cancelled"
                    else str(terminal.data["error"]["type"])
                )
                # Not shielded: a paced stream may make this wait, and that is fine.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await emit.send(terminal)
                terminal_sent = True
            except BaseException as exc:
                if classify_agent_failure(exc) is not None:
                    raise  # not ours: a bug in the runtime itself; let the session see it
                if not terminal_sent:
                    await emit_shielded(event("agent_cancelled", {"reason": "shutdown"}))
                raise
            finally:
                done = RunFinished(start.run_id, start.thread_id)
                try:
                    finished.send_nowait(done)  # the usual case: room in the actor's inbox
                except trio.WouldBlock:
                    await emit_shielded(done)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the agent actor is gone: the session is being torn down
