"""Execution tracking: each run's state machine, phase and timings, in process.

A run moves through ``queued -> running -> completed | failed | cancelled |
timed_out`` (or straight from ``queued`` to ``cancelled``). Transitions come
from exactly two places, both synchronous steps of the runtime's trio thread:
the agent actor admitting a run (``queued``) and the sequencer publishing the
run's events (``agent_started`` and the terminal event). The store derives its
``runs`` table from the same events with the same rules (``state_after``), so
the in-process view and the persisted one cannot disagree.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import attrs

from ._exceptions import NetraError
from ._messages import Event

logger = logging.getLogger("netra_actors.tracker")

RunState = Literal["queued", "running", "completed", "failed", "cancelled", "timed_out"]
RUN_STATES: tuple[RunState, ...] = get_args(RunState)
FINISHED_STATES: frozenset[RunState] = frozenset({"completed", "failed", "cancelled", "timed_out"})

#: The only legal moves; a finished run never moves again.
TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"completed", "failed", "cancelled", "timed_out"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
    "timed_out": frozenset(),
}


class IllegalTransition(NetraError):
    """A run was asked to move along an edge the state machine does not have."""


def state_after(event_type: str, data: Mapping[str, Any]) -> RunState | None:
    """The state an event moves its run to, or None for events inside a run."""
    if event_type == "agent_started":
        return "running"
    if event_type == "agent_completed":
        return "completed"
    if event_type == "agent_cancelled":
        return "cancelled"
    if event_type == "agent_error":
        error = data.get("error")
        kind = error.get("type") if isinstance(error, Mapping) else None
        return "timed_out" if kind == "timeout" else "failed"
    return None


def check_transition(current: RunState | None, target: RunState) -> None:
    """Raise ``IllegalTransition`` unless a run in ``current`` may move to ``target``.

    An unknown run (``current`` None) may appear as ``queued``, ``running`` (its admission was not
    seen, e.g. it was recovered from the store) or ``cancelled`` (a queued run
    cancelled before it was seen).
    """
    allowed = (
        frozenset({"queued", "running", "cancelled"}) if current is None else TRANSITIONS[current]
    )
    if target not in allowed:
        raise IllegalTransition(f"a run cannot move from {current or 'nothing'} to {target}")


@attrs.frozen
class RunSnapshot:
    """One run as the tracker knows it at one moment."""

    run_id: str
    session_id: str
    user_id: str
    thread_id: str
    state: RunState
    #: What the run is doing: ``thinking``, ``tool:<name>`` (``tools:<a>,<b>`` for several
    #: at once), ``started`` before its first step, None when queued or finished.
    phase: str | None
    #: Every state the run entered, with the wall-clock time (``time.time()``) it did.
    transitions: tuple[tuple[RunState, float], ...]
    agent_name: str | None = None
    trace_id: str | None = None
    error: Mapping[str, Any] | None = None

    def entered(self, state: RunState) -> float | None:
        """When the run entered ``state`` (None if it never did)."""
        return next((ts for s, ts in self.transitions if s == state), None)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def duration(self) -> float | None:
        """Seconds from ``running`` to the end (None while it runs or if it never ran)."""
        start = self.entered("running")
        return None if start is None or not self.finished else self.transitions[-1][1] - start


class _Run:
    """The tracker's mutable record of one run (owned by the tracker)."""

    def __init__(self, run_id: str, session_id: str, user_id: str, thread_id: str) -> None:
        self.run_id = run_id
        self.session_id = session_id
        self.user_id = user_id
        self.thread_id = thread_id
        self.state: RunState | None = None
        self.transitions: list[tuple[RunState, float]] = []
        self.open_tools: dict[str, str] = {}  # call_id -> tool name
        self.phase: str | None = None
        self.agent_name: str | None = None
        self.trace_id: str | None = None
        self.error: Mapping[str, Any] | None = None

    def move(self, target: RunState, ts: float) -> None:
        check_transition(self.state, target)
        self.state = target
        self.transitions.append((target, ts))

    def snapshot(self) -> RunSnapshot:
        assert self.state is not None
        return RunSnapshot(
            run_id=self.run_id,
            session_id=self.session_id,
            user_id=self.user_id,
            thread_id=self.thread_id,
            state=self.state,
            phase=self.phase,
            transitions=tuple(self.transitions),
            agent_name=self.agent_name,
            trace_id=self.trace_id,
            error=self.error,
        )


class ExecutionTracker:
    """Every live run of a runtime, and the most recent finished ones.

    Read it through ``run``, ``runs`` and ``counts``; it is written only by the
    runtime (``admitted`` and ``observe``). Keeps at most ``keep_finished``
    finished runs (the oldest are forgotten; the store keeps them all).
    """

    def __init__(self, keep_finished: int = 10_000) -> None:
        self.keep_finished = keep_finished
        self._live: dict[str, _Run] = {}
        self._finished: OrderedDict[str, _Run] = OrderedDict()
        #: Cumulative number of runs that ended in each finished state.
        self.finished_totals: dict[str, int] = dict.fromkeys(FINISHED_STATES, 0)
        #: Cumulative number of events published by every session.
        self.events_published = 0

    # -- written by the runtime -------------------------------------------------------------

    def admitted(
        self,
        run_id: str,
        *,
        session_id: str,
        user_id: str,
        thread_id: str,
        agent_name: str,
        trace_id: str,
    ) -> None:
        """A run was accepted and queued (it starts as soon as its thread is free)."""
        run = _Run(run_id, session_id, user_id, thread_id)
        run.agent_name, run.trace_id = agent_name, trace_id
        run.move("queued", time.time())
        self._live[run_id] = run

    def observe(self, session_id: str, user_id: str, events: Sequence[Event]) -> None:
        """Apply a session's newly published events (in ``seq`` order)."""
        self.events_published += len(events)
        for event in events:
            run = self._live.get(event.run_id)
            if run is None:
                if event.run_id in self._finished:
                    continue  # after the terminal event: nothing changes a finished run
                run = self._live[event.run_id] = _Run(
                    event.run_id, session_id, user_id, event.thread_id
                )
                run.trace_id = event.trace_id
            try:
                self._apply(run, event)
            except IllegalTransition:
                # A bug upstream; the stream itself is right, so log it, never stop it.
                logger.exception("run %s: event %s seq %s", event.run_id, event.type, event.seq)

    def _apply(self, run: _Run, event: Event) -> None:
        data = event.data
        target = state_after(event.type, data)
        if target is not None:
            run.move(target, event.ts)
            if target == "running":
                run.phase = "started"
                name = data.get("agent_name")
                run.agent_name = name if isinstance(name, str) else run.agent_name
            elif target in FINISHED_STATES:
                run.phase = None
                run.open_tools.clear()
                error = data.get("error")
                run.error = error if isinstance(error, Mapping) else None
                self.finished_totals[target] += 1
                del self._live[run.run_id]
                self._finished[run.run_id] = run
                while len(self._finished) > self.keep_finished:
                    self._finished.popitem(last=False)
            return
        call_id = data.get("call_id")
        if event.type == "tool_executing" and isinstance(call_id, str):
            run.open_tools[call_id] = str(data.get("tool_name"))
        elif event.type == "tool_completed" and isinstance(call_id, str):
            run.open_tools.pop(call_id, None)
        elif event.type not in ("agent_thinking", "partial_result"):
            return
        if run.open_tools:
            names = sorted(set(run.open_tools.values()))
            run.phase = ("tool:" if len(names) == 1 else "tools:") + ",".join(names)
        else:
            run.phase = "thinking"

    # -- read by anyone ----------------------------------------------------------------------

    def run(self, run_id: str) -> RunSnapshot | None:
        """The run's current state, or None if it is unknown (or long forgotten)."""
        run = self._live.get(run_id) or self._finished.get(run_id)
        return run.snapshot() if run is not None and run.state is not None else None

    def runs(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        states: Iterable[RunState] | None = None,
    ) -> list[RunSnapshot]:
        """The runs that match, in the order they were first seen (finished ones first)."""
        wanted = None if states is None else frozenset(states)
        return [
            run.snapshot()
            for run in (*self._finished.values(), *self._live.values())
            if run.state is not None
            and (session_id is None or run.session_id == session_id)
            and (user_id is None or run.user_id == user_id)
            and (wanted is None or run.state in wanted)
        ]

    def counts(self) -> dict[RunState, int]:
        """How many runs are in each state now (finished: only those still remembered)."""
        counts: dict[RunState, int] = dict.fromkeys(RUN_STATES, 0)
        for run in (*self._finished.values(), *self._live.values()):
            if run.state is not None:
                counts[run.state] += 1
        return counts
