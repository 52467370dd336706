"""The ``Runtime``: a root nursery of supervised sessions, usable without any server.

``async with Runtime(...) as runtime`` starts it; ``start_run`` starts a run
and returns a ``RunHandle`` whose ``events()`` yields that run's events until
its terminal event. The WebSocket server is a layer on top
(``serve_connection`` hands it a transport).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from functools import partial
from types import TracebackType
from typing import Any

import attrs
import trio

from ._agents import Agent, demo_agent, demo_llm, demo_tools
from ._config import Config
from ._connection import Connection
from ._conversations import ConversationStore, MemoryConversationStore
from ._exceptions import NetraError, RunRefused, RuntimeClosed
from ._llm import LLMManager, LLMProvider
from ._manager import UnifiedWebSocketManager
from ._messages import TERMINAL_EVENTS, CancelOutcome, EmitEvent, Event, ThreadPolicy
from ._openai import OpenAIChatProvider, RetryPolicy
from ._sequencer import EventStore, Subscription, event_from_frame, stamp
from ._session import Session, SessionServices, SessionStatistics
from ._store import OpenRun, RunStore, open_store
from ._telemetry import Telemetry
from ._tools import ToolRegistry, UnifiedToolExecutionEngine
from ._trace import UnifiedTraceContext
from ._tracker import ExecutionTracker, RunSnapshot, RunState
from ._transport import Transport

logger = logging.getLogger("netra_actors.runtime")


@attrs.frozen
class RuntimeStatistics:
    """A snapshot of the whole runtime."""

    sessions: int
    connections: int
    active_runs: int
    queued_runs: int
    #: Tasks the runtime runs for sessions and connections; not its own services (the
    #: store's writer, retention, the stall watch), which live as long as it does.
    tasks: int


def openai_provider(config: Config) -> OpenAIChatProvider:
    """The OpenAI-compatible provider ``config`` describes; the key from ``OPENAI_API_KEY``."""
    return OpenAIChatProvider(
        base_url=config.base_url,
        model=config.model,
        api_key=os.environ.get("OPENAI_API_KEY"),
        timeout=config.llm_timeout,
        connect_timeout=config.llm_connect_timeout,
        retry=RetryPolicy(max_retries=config.llm_max_retries),
    )


class RunHandle:
    """A run started through the in-process API.

    ``events()`` yields the run's events in ``seq`` order from ``agent_started``
    (or the lone ``agent_cancelled`` of a run cancelled while queued) to its
    terminal event, then stops. It can be iterated once. Each event is decoded
    from the frame a WebSocket client receives, so its ``data`` is what JSON
    carries (lists for tuples, text for values JSON cannot hold), whether it
    came from the replay window or from the store.
    """

    def __init__(
        self, session: Session, run_id: str, thread_id: str, subscription: Subscription
    ) -> None:
        self.session = session
        self.run_id = run_id
        self.thread_id = thread_id
        self._subscription = subscription

    async def events(self) -> AsyncIterator[Event]:
        """Yield this run's events; returns after the terminal event.

        Raises:
            RuntimeClosed: the session ended before the run's terminal event.
        """
        sub = self._subscription
        try:
            while True:
                batch = await sub.next_batch()
                if batch is None:
                    raise RuntimeClosed(f"session ended before run {self.run_id} finished")
                for frame in batch[1]:
                    # Other runs' events of the session are not decoded (the id test on
                    # the text only spares the decoding; the decoded id decides).
                    if self.run_id not in frame:
                        continue
                    event = event_from_frame(frame)
                    if event.run_id == self.run_id:
                        yield event
                        if event.type in TERMINAL_EVENTS:
                            return
        finally:
            sub.close()

    async def collect(self) -> list[Event]:
        """All of the run's events, once it has ended."""
        return [event async for event in self.events()]

    async def cancel(self, reason: str = "client") -> CancelOutcome:
        """Cancel the run (queued or active)."""
        return await self.session.cancel_run(self.run_id, reason)

    def close(self) -> None:
        """Stop reading the run's events (and stop pacing the session); idempotent."""
        self._subscription.close()


class Runtime:
    """Sessions, agents, tools and the LLM manager of one process.

    Use as ``async with Runtime(config) as runtime:``. Leaving the block shuts
    down: every run is cancelled with reason ``shutdown`` and gets
    ``config.shutdown_grace`` seconds to emit its terminal event, then the
    sessions are closed. Cancelling the enclosing scope instead cancels
    everything at once (runs still emit ``agent_cancelled`` where they can).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        agents: Mapping[str, Agent] | None = None,
        tools: ToolRegistry | None = None,
        llm: LLMManager | LLMProvider | None = None,
        store: RunStore | EventStore | None = None,
        conversations: ConversationStore | None = None,
        telemetry: Telemetry | None = None,
        run_timeouts: Mapping[str, float | None] | None = None,
    ) -> None:
        self.config = config or Config()
        if store is None and self.config.store == "sqlite":
            store = open_store(self.config.data_dir, synchronous=self.config.sqlite_synchronous)
        #: The store, when it is a full ``RunStore`` (runs, resume across restarts).
        self.store = store if isinstance(store, RunStore) else None
        if conversations is None and self.store is not None:
            conversations = self.store.conversations
        #: Every live run and the recent finished ones (``run_state``, ``runs``).
        self.tracker = ExecutionTracker()
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        if llm is None and self.config.llm == "openai":
            llm = openai_provider(self.config)
        if agents is None:
            agents = {"demo": demo_agent(self.config.max_steps)}
            tools = tools or demo_tools()
            llm = llm or demo_llm()
        if not isinstance(llm, LLMManager):
            llm = LLMManager([llm] if llm is not None else [demo_llm()])
        self.llm = llm
        self.tools = tools or ToolRegistry()
        self.engine = UnifiedToolExecutionEngine(
            self.tools,
            default_timeout=self.config.tool_timeout,
            max_concurrent=self.config.max_concurrent_tools,
        )
        self.engine.telemetry = self.llm.telemetry = self.telemetry
        default_agent = self.config.agent if self.config.agent in agents else next(iter(agents))
        self._services = SessionServices(
            agents=dict(agents),
            default_agent=default_agent,
            engine=self.engine,
            llm=self.llm,
            config=self.config,
            store=store,
            conversations=conversations if conversations is not None else MemoryConversationStore(),
            telemetry=self.telemetry,
            run_store=self.store,
            tracker=self.tracker,
            run_timeouts=dict(run_timeouts or {}),
        )
        self.manager = UnifiedWebSocketManager()
        # Users whose session is being set up (reading the store), to set up one only.
        self._starting: dict[str, trio.Event] = {}
        self._background = trio.CancelScope()
        self._watching = trio.CancelScope()  # the stall watch, stopped once sessions closed
        self._service_tasks: set[trio.lowlevel.Task] = set()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self._closing = False
        self._ids = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._service, self._watch_stalls)
        if self.store is not None:
            try:
                await self._nursery.start(self._service, self.store.run)
                await self.recover()
                self._nursery.start_soon(self._service, self._retention)
            except BaseException as exc:
                self._nursery.cancel_scope.cancel()
                await self._nursery_cm.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if exc is None:
            await self.aclose()
        else:
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]

    @property
    def closing(self) -> bool:
        """Whether shutdown has begun (no new sessions or runs are accepted)."""
        return self._closing

    async def aclose(self) -> None:
        """Shut down gracefully: stop taking runs, cancel runs (``shutdown``), close sessions.

        Each session's active runs get ``config.shutdown_grace`` seconds to emit
        their terminal events; connections receive every event, then close 1001.
        """
        if self._closing:
            return
        self._closing = True
        async with trio.open_nursery() as nursery:
            for session in self.manager.sessions():
                nursery.start_soon(session.aclose)
        self._background.cancel()
        self._watching.cancel()
        if self.store is not None:
            await self.store.aclose()

    # -- persistence --------------------------------------------------------------------------

    async def recover(self) -> int:
        """Close the runs the previous process left open; returns how many.

        Each open tool call gets ``tool_completed`` (status ``cancelled``), then
        the run gets ``agent_error`` of type ``interrupted``, appended to its
        session's stored stream after its last ``seq``: a client resuming later
        receives them like any other event. A run that was accepted but still
        queued gets a lone ``agent_cancelled`` (reason ``shutdown``), as at a
        graceful shutdown. Runs at start, before any session.
        """
        assert self.store is not None
        open_runs = await self.store.open_runs()
        for open_run in open_runs:
            await self._interrupt(open_run)
        if open_runs:
            logger.warning("closed %d run(s) interrupted by the last shutdown", len(open_runs))
        return len(open_runs)

    async def _interrupt(self, open_run: OpenRun) -> None:
        assert self.store is not None
        run = open_run.run
        stored = await self.store.session_for(run.user_id)
        if stored is None or stored.session_id != run.session_id:
            return  # the stream is gone (pruned with its session): nothing to close
        trace = UnifiedTraceContext(run.trace_id or "0" * 32, run.span_id or "0" * 16)
        if run.first_seq is None:
            # Accepted and still queued: it never started, so it ends as queued runs do
            # at a shutdown.
            cancelled = EmitEvent(
                "agent_cancelled", run.run_id, run.thread_id, trace, {"reason": "shutdown"}
            )
            events = [stamp(cancelled, stored.last_seq + 1, time.time())]
            await self.store.append(run.session_id, events)
            return
        messages = [
            EmitEvent(
                "tool_completed",
                run.run_id,
                run.thread_id,
                attrs.evolve(trace, span_id=call.span_id),
                {
                    "call_id": call.call_id,
                    "tool_name": call.tool_name,
                    "status": "cancelled",
                    "duration_ms": 0,
                    "error": {
                        "type": "cancelled",
                        "message": "the server stopped while the tool was running",
                    },
                },
            )
            for call in open_run.open_calls
        ]
        messages.append(
            EmitEvent(
                "agent_error",
                run.run_id,
                run.thread_id,
                trace,
                {
                    "error": {
                        "type": "interrupted",
                        "message": "the server stopped while the run was active",
                    }
                },
            )
        )
        ts = time.time()
        events = [stamp(m, seq, ts) for seq, m in enumerate(messages, stored.last_seq + 1)]
        await self.store.append(run.session_id, events)

    async def prune(self) -> int:
        """One retention pass over the store (see ``retention_*`` in ``Config``)."""
        if self.store is None:
            return 0
        dropped = await self.store.prune(
            max_age=self.config.retention_max_age, max_events=self.config.retention_max_events
        )
        for session in self.manager.sessions():
            stored = await self.store.session_for(session.user_id)
            if stored is not None and stored.session_id == session.session_id:
                session.sequencer.stored_from = stored.first_seq
        return dropped

    async def _service(
        self,
        fn: Callable[..., Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one of the runtime's own services (not counted in ``statistics().tasks``)."""
        task = trio.lowlevel.current_task()
        self._service_tasks.add(task)
        try:
            if task_status is trio.TASK_STATUS_IGNORED:
                await fn()
            else:
                await fn(task_status=task_status)
        finally:
            self._service_tasks.discard(task)

    async def _watch_stalls(self) -> None:
        with self._watching:
            await self._services.stall_watch.run()

    async def _retention(self) -> None:
        with self._background:
            while True:
                try:
                    dropped = await self.prune()
                except Exception:
                    logger.exception("pruning the store failed")
                else:
                    if dropped:
                        logger.info("pruned %d stored event(s)", dropped)
                await trio.sleep(self.config.retention_interval)

    # -- sessions -----------------------------------------------------------------------------

    async def session(self, user_id: str) -> Session:
        """The user's session, started if there is none. Raises ``RuntimeClosed``."""
        while True:
            if self._closing or self._nursery is None:
                raise RuntimeClosed("the runtime is not running")
            starting = self._starting.get(user_id)
            if starting is not None:
                await starting.wait()
                continue
            session = self.manager.session_for(user_id)
            if session is not None and not session.closing:
                await session.wait_ready()
                return session
            if session is not None and self.store is not None:
                # The stream goes on in a new session once the old one has stored
                # its last event.
                await session.aclose()
                continue
            self._starting[user_id] = trio.Event()
            try:
                session = await self._new_session(user_id)
            finally:
                self._starting.pop(user_id).set()
            return session

    async def _new_session(self, user_id: str) -> Session:
        assert self._nursery is not None
        session_id: str | None = None
        last_seq = 0
        stored_from: int | None = None
        if self.store is not None:
            stored = await self.store.session_for(user_id)
            if stored is None:
                session_id = "sess_" + uuid.uuid4().hex
                await self.store.create_session(session_id, user_id)
                stored_from = 1
            else:
                session_id, last_seq = stored.session_id, stored.last_seq
                stored_from = stored.first_seq
        session = Session(
            user_id,
            self._services,
            session_id=session_id,
            last_seq=last_seq,
            stored_from=stored_from,
            on_closed=self.manager.remove_session,
        )
        self.manager.add_session(session)
        await self._nursery.start(session.run)
        return session

    async def start_run(
        self,
        user_id: str,
        text: str,
        *,
        thread_id: str = "main",
        agent: str | None = None,
        client_msg_id: str | None = None,
        traceparent: str | None = None,
        policy: ThreadPolicy | None = None,
    ) -> RunHandle:
        """Start (or queue) a run for ``user_id``; iterate the handle's ``events()``.

        The handle's reader paces the session like a connection does: iterate
        its ``events()`` (or ``close()`` it) so that it does not hold the
        session's producers back once the window is full.

        Raises:
            RuntimeClosed: the runtime or the session is shutting down.
            RunRefused: the thread policy or a limit refused the run.
        """
        session = await self.session(user_id)
        # Subscribe before the run is admitted, so none of its events can be missed.
        subscription = session.subscribe()
        try:
            admission = await session.start_run(
                text,
                thread_id=thread_id,
                agent=agent,
                client_msg_id=client_msg_id,
                trace=UnifiedTraceContext.from_traceparent(traceparent),
                policy=policy,
            )
            if not admission.accepted:
                if admission.code == "unavailable":
                    raise RuntimeClosed(admission.message or "session is closing")
                raise RunRefused(admission.code or "refused", admission.message or "run refused")
        except BaseException:
            subscription.close()
            raise
        return RunHandle(session, admission.run_id, admission.thread_id, subscription)

    async def cancel_run(self, user_id: str, run_id: str, reason: str = "client") -> CancelOutcome:
        """Cancel a run of ``user_id``; ``state`` says whether it was queued, active or unknown."""
        session = self.manager.session_for(user_id)
        if session is None:
            return CancelOutcome(run_id, "not_found")
        return await session.cancel_run(run_id, reason)

    async def serve_connection(
        self,
        user_id: str,
        transport: Transport,
        *,
        traceparent: str | None = None,
        after_seq: int | None = None,
        session_hint: str | None = None,
        batch: int = 1,
    ) -> Connection:
        """Run a connection actor for ``transport`` in the user's session until it ends.

        The connection actor lives in the session's nursery (the session
        supervises it); this waits for it, so a server's handler task can keep
        the underlying socket open for exactly as long as it is needed. With
        ``after_seq`` the connection resumes: it first receives the events after
        it (or a ``resume_gap`` when that cannot be served exactly; also when
        ``session_hint`` names another stream). With ``batch`` > 1 a backlog is
        sent as multi-event frames of up to ``batch`` events. Returns the finished
        ``Connection`` (its ``close_code`` says how it ended, its ``close_reason``
        why, when the server ended it: it also logs that at INFO).
        """
        connection = await self._start_connection(
            user_id,
            transport,
            traceparent=traceparent,
            after_seq=after_seq,
            session_hint=session_hint,
            batch=batch,
        )
        await connection.done.wait()
        return connection

    async def _start_connection(
        self,
        user_id: str,
        transport: Transport,
        *,
        traceparent: str | None = None,
        after_seq: int | None = None,
        session_hint: str | None = None,
        batch: int = 1,
    ) -> Connection:
        """``serve_connection`` without the wait: the connection actor is started in the
        user's session and returned; its ``done`` is set once it ended (the runtime
        forgets it then). The gateway waits in the frame that holds the socket's
        nursery, so an idle connection's handler task keeps fewer frames alive."""
        session = await self.session(user_id)
        connection = Connection(
            session,
            transport,
            connection_id=f"conn_{next(self._ids)}",
            config=self.config,
            traceparent=traceparent,
            after_seq=after_seq,
            session_hint=session_hint,
            batch=batch,
            on_done=partial(self.manager.remove_connection, user_id),
        )
        self.manager.add_connection(user_id, connection)
        try:
            session.spawn(connection.run)
        except NetraError:  # the session is closing: the actor never ran
            connection._ended()
            await transport.close(1001)
        return connection

    def statistics(self) -> RuntimeStatistics:
        sessions = [s.statistics() for s in self.manager.sessions()]
        return RuntimeStatistics(
            sessions=len(sessions),
            connections=sum(s.connections for s in sessions),
            active_runs=sum(s.active_runs for s in sessions),
            queued_runs=sum(s.queued_runs for s in sessions),
            tasks=len(self._nursery.child_tasks - self._service_tasks)
            if self._nursery is not None
            else 0,
        )

    # -- execution tracking -------------------------------------------------------------------

    def run_state(self, run_id: str) -> RunSnapshot | None:
        """A run's state, phase and transition times (live runs and recent finished ones)."""
        return self.tracker.run(run_id)

    def runs(
        self,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        states: Iterable[RunState] | None = None,
    ) -> list[RunSnapshot]:
        """The tracked runs that match (``session_id``: the runs of one session)."""
        return self.tracker.runs(user_id=user_id, session_id=session_id, states=states)

    def run_counts(self) -> dict[RunState, int]:
        """How many tracked runs are in each state."""
        return self.tracker.counts()

    def session_statistics(self, user_id: str) -> SessionStatistics | None:
        session = self.manager.session_for(user_id)
        return session.statistics() if session is not None else None
