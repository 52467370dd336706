"""Public lifecycle checker for the event stream a chat client receives.

A client (a test, a benchmark, an integration in another codebase) feeds every
server frame it receives to a :class:`LifecycleChecker`; the checker raises
:class:`LifecycleViolation` at the first frame that breaks the protocol's
ordering promises (docs/protocol.md):

1. every event frame has a well-typed envelope and the data fields of its type;
2. ``seq`` is gap-free within a stream and continues from ``session_ready.last_seq``;
3. a run starts with ``agent_started`` (except a run cancelled while queued,
   whose only event is ``agent_cancelled``), and keeps one ``thread_id`` and
   one ``trace_id``;
4. a run has exactly one terminal event and nothing after it;
5. every ``tool_executing`` is closed by a matching ``tool_completed`` before
   the run's terminal event.

Why a separate, dependency-free module: the checker is the executable form of
the protocol contract, so it must not share code with the server it checks (a
bug in shared code would be invisible to both). It therefore imports only the
standard library and attrs, does no I/O, and keeps O(1) work per event so it
can sit inside a benchmark's receive loop.
"""

from __future__ import annotations

import json
import math
import re
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeGuard

import attrs

# One source of truth for the vocabularies: the protocol module (see docs/protocol.md).
from ._messages import TERMINAL_EVENTS
from ._protocol import (
    AGENT_ERROR_TYPES,
    CANCEL_REASONS,
    EVENT_TYPES,
    TOOL_ERROR_TYPES,
    TOOL_STATUSES,
)

__all__ = [
    "AGENT_ERROR_TYPES",
    "CANCEL_REASONS",
    "EVENT_TYPES",
    "TERMINAL_EVENTS",
    "TOOL_ERROR_TYPES",
    "TOOL_STATUSES",
    "LifecycleChecker",
    "LifecycleReport",
    "LifecycleViolation",
    "RunSummary",
    "check_lifecycle",
]

# Precompiled once: feed() runs for every event of a benchmark.
_TRACE_ID: Final = re.compile(r"[0-9a-f]{32}")
_SPAN_ID: Final = re.compile(r"[0-9a-f]{16}")


class LifecycleViolation(AssertionError):
    """A frame broke a lifecycle rule.

    It subclasses ``AssertionError`` so that pytest reports it as a failed
    check rather than as an error in the test itself.

    Attributes:
        rule: Short machine name of the broken rule: ``bad_frame``, ``bad_field``,
            ``unknown_event``, ``vocabulary``, ``seq_gap``, ``first_event``,
            ``duplicate_start``, ``after_terminal``, ``thread_mismatch``,
            ``trace_mismatch``, ``duplicate_call_id``, ``unmatched_tool``,
            ``unclosed_tool`` or ``missing_terminal``.
        run_id: The run the offending frame belongs to, when known.
        seq: The offending frame's ``seq``, when known.
    """

    def __init__(
        self, message: str, *, rule: str, run_id: str | None = None, seq: int | None = None
    ) -> None:
        where = []
        if run_id is not None:
            where.append(f"run {run_id!r}")
        if seq is not None:
            where.append(f"seq {seq}")
        prefix = f"[{rule}] " + (", ".join(where) + ": " if where else "")
        super().__init__(prefix + message)
        self.message = message
        self.rule = rule
        self.run_id = run_id
        self.seq = seq

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments are not in ``args``; keep the exception picklable
        # (pytest-xdist, multiprocessing benchmarks).
        return (
            _rebuild_violation,
            (self.message, self.rule, self.run_id, self.seq),
        )


def _rebuild_violation(
    message: str, rule: str, run_id: str | None, seq: int | None
) -> LifecycleViolation:
    return LifecycleViolation(message, rule=rule, run_id=run_id, seq=seq)


@attrs.frozen
class RunSummary:
    """What the checker saw of one run.

    Attributes:
        run_id: The run.
        thread_id: The thread all its events carried.
        event_types: Its event types, in arrival order.
        terminal: Its terminal event type, or ``None`` while it is still open.
        tool_calls: How many ``tool_executing`` events it had.
        first_seq: ``seq`` of its first event.
        last_seq: ``seq`` of its last event.
    """

    run_id: str
    thread_id: str
    event_types: tuple[str, ...]
    terminal: str | None
    tool_calls: int
    first_seq: int
    last_seq: int


@attrs.frozen
class LifecycleReport:
    """The result of a checked stream, returned by :meth:`LifecycleChecker.finish`.

    Attributes:
        events: Number of event frames accepted.
        runs: One summary per run id, in order of each run's first event (read-only).
        first_seq: ``seq`` of the first event, or ``None`` when there was none.
        last_seq: ``seq`` of the last event, or ``None`` when there was none.
    """

    events: int
    runs: Mapping[str, RunSummary]
    first_seq: int | None
    last_seq: int | None

    def terminal_counts(self) -> dict[str, int]:
        """Count runs per terminal event type.

        Every type of ``TERMINAL_EVENTS`` is present (possibly 0) so callers can
        index without ``.get``; runs without a terminal event are not counted.
        """
        counts = dict.fromkeys(sorted(TERMINAL_EVENTS), 0)
        for summary in self.runs.values():
            if summary.terminal is not None:
                counts[summary.terminal] += 1
        return counts


@attrs.define
class _RunState:
    """Mutable per-run bookkeeping; only the checker sees it."""

    thread_id: str
    trace_id: str
    first_seq: int
    last_seq: int
    event_types: list[str] = attrs.field(factory=list)
    terminal: str | None = None
    tool_calls: int = 0
    #: call_id -> tool_name of calls that have not completed yet.
    open_calls: dict[str, str] = attrs.field(factory=dict)
    #: every call_id the run has used, open or completed.
    call_ids: set[str] = attrs.field(factory=set)

    def summary(self, run_id: str) -> RunSummary:
        return RunSummary(
            run_id=run_id,
            thread_id=self.thread_id,
            event_types=tuple(self.event_types),
            terminal=self.terminal,
            tool_calls=self.tool_calls,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
        )


# --- field validation -------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, but True is not a valid seq or step.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Fields:
    """Field checks for one event, raising ``bad_field`` / ``vocabulary`` with its location."""

    __slots__ = ("run_id", "seq", "strict_vocab", "type")

    def __init__(self, event_type: str, run_id: str, seq: int, strict_vocab: bool) -> None:
        self.type = event_type
        self.run_id = run_id
        self.seq = seq
        self.strict_vocab = strict_vocab

    def fail(self, message: str, rule: str = "bad_field") -> LifecycleViolation:
        return LifecycleViolation(
            f"{self.type}: {message}", rule=rule, run_id=self.run_id, seq=self.seq
        )

    def string(self, data: Mapping[str, Any], key: str, where: str = "data") -> str:
        value = data.get(key)
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key} must be a string, got {value!r}")
        return value

    def vocab(self, value: str, allowed: frozenset[str], what: str) -> None:
        if self.strict_vocab and value not in allowed:
            raise self.fail(f"{what} {value!r} is not one of {sorted(allowed)}", rule="vocabulary")

    def error(self, data: Mapping[str, Any], allowed: frozenset[str]) -> None:
        error = data.get("error")
        if not isinstance(error, Mapping):
            raise self.fail(f"data.error must be an object, got {error!r}")
        self.vocab(self.string(error, "type", "data.error"), allowed, "error type")
        self.string(error, "message", "data.error")


def _check_agent_started(f: _Fields, data: Mapping[str, Any]) -> None:
    f.string(data, "agent_name")
    f.string(data, "user_id")
    f.string(data, "text")
    if "client_msg_id" in data and data["client_msg_id"] is not None:
        f.string(data, "client_msg_id")


def _check_agent_thinking(f: _Fields, data: Mapping[str, Any]) -> None:
    f.string(data, "reasoning")
    if not _is_int(data.get("step")):
        raise f.fail(f"data.step must be an integer, got {data.get('step')!r}")


def _check_tool_executing(f: _Fields, data: Mapping[str, Any]) -> None:
    f.string(data, "call_id")
    f.string(data, "tool_name")
    if not isinstance(data.get("parameters"), Mapping):
        raise f.fail(f"data.parameters must be an object, got {data.get('parameters')!r}")


def _check_tool_completed(f: _Fields, data: Mapping[str, Any]) -> None:
    f.string(data, "call_id")
    f.string(data, "tool_name")
    status = f.string(data, "status")
    f.vocab(status, TOOL_STATUSES, "tool status")
    if status == "ok":
        if "results" not in data:
            raise f.fail("data.results is required when status is 'ok'")
    else:
        f.error(data, TOOL_ERROR_TYPES)
    duration = data.get("duration_ms")
    if not _is_number(duration) or not (math.isfinite(duration) and duration >= 0):
        raise f.fail(f"data.duration_ms must be a finite number >= 0, got {duration!r}")


def _check_partial_result(f: _Fields, data: Mapping[str, Any]) -> None:
    f.string(data, "text")


def _check_agent_completed(f: _Fields, data: Mapping[str, Any]) -> None:
    if data.get("status") != "ok":
        raise f.fail(f"data.status must be 'ok', got {data.get('status')!r}")
    f.string(data, "final_response")


def _check_agent_error(f: _Fields, data: Mapping[str, Any]) -> None:
    f.error(data, AGENT_ERROR_TYPES)


def _check_agent_cancelled(f: _Fields, data: Mapping[str, Any]) -> None:
    f.vocab(f.string(data, "reason"), CANCEL_REASONS, "cancel reason")


_DATA_CHECKS: Final[dict[str, Callable[[_Fields, Mapping[str, Any]], None]]] = {
    "agent_started": _check_agent_started,
    "agent_thinking": _check_agent_thinking,
    "tool_executing": _check_tool_executing,
    "tool_completed": _check_tool_completed,
    "partial_result": _check_partial_result,
    "agent_completed": _check_agent_completed,
    "agent_error": _check_agent_error,
    "agent_cancelled": _check_agent_cancelled,
}
assert _DATA_CHECKS.keys() == EVENT_TYPES


# --- the checker ------------------------------------------------------------------------------


@attrs.define
class LifecycleChecker:
    """Incremental lifecycle checker: feed frames one by one as they arrive.

    Usable inside a receive loop or a benchmark: :meth:`feed` does O(1) work
    per event with plain dict/set state. When :meth:`feed` raises, the checker's
    state is left as it was before that frame, so a caller may log the violation
    and keep feeding.

    Args:
        first_seq: The ``seq`` the first event must have when no ``session_ready``
            came before it; ``None`` accepts any start.
        require_terminal: :meth:`finish` fails when a run has no terminal event.
            Turn it off for a stream cut short on purpose (e.g. a benchmark window).
        strict_seq: Each event's ``seq`` must be exactly the previous one + 1, and
            a ``session_ready`` pins the next event's ``seq`` to its ``last_seq + 1``.
            When off, ``seq`` need only increase (gaps allowed, e.g. a client that
            was told ``resume_gap``) and a ``session_ready`` just starts a new stream
            whose first ``seq`` is free.
        strict_vocab: Check enumerated string fields (tool status, error types,
            cancel reasons) against the v1 vocabularies. Turn it off to accept
            vocabulary entries added by a later protocol version.
    """

    first_seq: int | None = attrs.field(default=None, kw_only=True)
    require_terminal: bool = attrs.field(default=True, kw_only=True)
    strict_seq: bool = attrs.field(default=True, kw_only=True)
    strict_vocab: bool = attrs.field(default=True, kw_only=True)

    # With strict_seq the exact next seq, otherwise its lower bound; None = any.
    _next_seq: int | None = attrs.field(init=False, default=None)
    _runs: dict[str, _RunState] = attrs.field(init=False, factory=dict)
    _events: int = attrs.field(init=False, default=0)
    _first_seen: int | None = attrs.field(init=False, default=None)
    _last_seen: int | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._next_seq = self.first_seq

    @property
    def events_seen(self) -> int:
        """Number of event frames accepted so far."""
        return self._events

    @property
    def runs(self) -> Mapping[str, RunSummary]:
        """A snapshot summary of every run seen so far, in order of first event."""
        return types.MappingProxyType(
            {run_id: state.summary(run_id) for run_id, state in self._runs.items()}
        )

    def run_events(self, run_id: str) -> list[str]:
        """The event types seen for ``run_id``, in order.

        Raises:
            KeyError: no event of that run was seen (catches typos in tests).
        """
        return list(self._runs[run_id].event_types)

    def feed(self, frame: Mapping[str, Any]) -> None:
        """Check one decoded server frame.

        A frame with a ``seq`` key, or whose ``type`` is an event type, is an
        event and is checked against every rule; a multi-event frame (``type``
        ``events``) is checked as its events, in order. Any other frame (``run_accepted``,
        ``pong``, ``error``, frames of later protocol versions) is ignored, except
        ``session_ready``, which starts a stream (see ``strict_seq``).

        Raises:
            LifecycleViolation: at the first broken rule; the checker's state is
                unchanged by the offending frame.
        """
        if not isinstance(frame, Mapping):
            raise LifecycleViolation(
                f"frame must be a JSON object, got {type(frame).__name__}", rule="bad_frame"
            )
        event_type = frame.get("type")
        if not isinstance(event_type, str):
            raise LifecycleViolation(
                f"frame must have a string 'type', got {event_type!r}", rule="bad_frame"
            )
        if event_type == "events":
            self._feed_events(frame.get("events"))
            return
        if "seq" in frame or event_type in EVENT_TYPES:
            self._feed_event(event_type, frame)
        elif event_type == "session_ready":
            self._feed_session_ready(frame)
        elif event_type == "resume_gap" and self.strict_seq:
            # The server could not resume exactly; the stream continues from its oldest event.
            oldest = frame.get("oldest_seq")
            if not _is_int(oldest) or oldest < 1:
                raise LifecycleViolation(
                    f"resume_gap.oldest_seq must be an integer >= 1, got {oldest!r}",
                    rule="bad_field",
                )
            self._next_seq = oldest

    def _feed_events(self, events: Any) -> None:
        """A multi-event frame: a non-empty list of events, each checked in turn."""
        if not isinstance(events, list) or not events:
            raise LifecycleViolation(
                "an 'events' frame must carry a non-empty list of events", rule="bad_frame"
            )
        for event in events:
            if not isinstance(event, Mapping) or event.get("type") not in EVENT_TYPES:
                raise LifecycleViolation(
                    f"an 'events' frame may carry only events, got {event!r}", rule="bad_frame"
                )
            self.feed(event)

    def finish(self) -> LifecycleReport:
        """End-of-stream checks; returns the report.

        Safe to call more than once (it changes no state).

        Raises:
            LifecycleViolation: ``missing_terminal`` when ``require_terminal`` is on
                and a run has no terminal event.
        """
        if self.require_terminal:
            open_runs = [run_id for run_id, run in self._runs.items() if run.terminal is None]
            if open_runs:
                first = self._runs[open_runs[0]]
                raise LifecycleViolation(
                    f"{len(open_runs)} run(s) without a terminal event: {open_runs[:10]!r}"
                    f" (first one's events: {first.event_types[-5:]!r}...)",
                    rule="missing_terminal",
                    run_id=open_runs[0],
                    seq=first.last_seq,
                )
        return LifecycleReport(
            events=self._events,
            runs=self.runs,
            first_seq=self._first_seen,
            last_seq=self._last_seen,
        )

    # --- internals ---------------------------------------------------------------------------

    def _feed_session_ready(self, frame: Mapping[str, Any]) -> None:
        if not self.strict_seq:
            self._next_seq = None
            return
        last_seq = frame.get("last_seq")
        if not _is_int(last_seq) or last_seq < 0:
            raise LifecycleViolation(
                f"session_ready.last_seq must be an integer >= 0, got {last_seq!r}",
                rule="bad_field",
            )
        # A resuming connection's stream restarts after ``after_seq``.
        after_seq = frame.get("after_seq")
        if after_seq is not None:
            if not _is_int(after_seq) or after_seq < 0:
                raise LifecycleViolation(
                    f"session_ready.after_seq must be an integer >= 0, got {after_seq!r}",
                    rule="bad_field",
                )
            self._next_seq = after_seq + 1
            return
        self._next_seq = last_seq + 1

    def _feed_event(self, event_type: str, frame: Mapping[str, Any]) -> None:
        # Envelope (rule 1). run_id and seq first, so later errors can name them.
        run_id = frame.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise LifecycleViolation(
                f"{event_type}: run_id must be a non-empty string, got {run_id!r}",
                rule="bad_field",
                seq=frame.get("seq") if _is_int(frame.get("seq")) else None,
            )
        seq = frame.get("seq")
        if not _is_int(seq) or seq < 1:
            raise LifecycleViolation(
                f"{event_type}: seq must be an integer >= 1, got {seq!r}",
                rule="bad_field",
                run_id=run_id,
            )
        if event_type not in EVENT_TYPES:
            raise LifecycleViolation(
                f"unknown event type {event_type[:64]!r}",
                rule="unknown_event",
                run_id=run_id,
                seq=seq,
            )
        fields = _Fields(event_type, run_id, seq, self.strict_vocab)
        thread_id = frame.get("thread_id")
        if not isinstance(thread_id, str) or not thread_id:
            raise fields.fail(f"thread_id must be a non-empty string, got {thread_id!r}")
        if not _is_number(frame.get("ts")):
            raise fields.fail(f"ts must be a number, got {frame.get('ts')!r}")
        trace_id = frame.get("trace_id")
        if not isinstance(trace_id, str) or not _TRACE_ID.fullmatch(trace_id):
            raise fields.fail(f"trace_id must be 32 lowercase hex digits, got {trace_id!r}")
        span_id = frame.get("span_id")
        if not isinstance(span_id, str) or not _SPAN_ID.fullmatch(span_id):
            raise fields.fail(f"span_id must be 16 lowercase hex digits, got {span_id!r}")
        data = frame.get("data")
        if not isinstance(data, Mapping):
            raise fields.fail(f"data must be an object, got {data!r}")
        _DATA_CHECKS[event_type](fields, data)

        # Sequence (rule 2).
        expected = self._next_seq
        if expected is not None:
            if self.strict_seq and seq != expected:
                kind = "duplicate or reordered" if seq < expected else "gap"
                raise LifecycleViolation(
                    f"{event_type}: expected seq {expected}, got {seq} ({kind})",
                    rule="seq_gap",
                    run_id=run_id,
                    seq=seq,
                )
            if not self.strict_seq and seq < expected:
                raise LifecycleViolation(
                    f"{event_type}: seq must increase, got {seq} after {expected - 1}",
                    rule="seq_gap",
                    run_id=run_id,
                    seq=seq,
                )

        # Run lifecycle (rules 3-5); check everything before mutating anything.
        def fail(message: str, rule: str) -> LifecycleViolation:
            return LifecycleViolation(f"{event_type}: {message}", rule=rule, run_id=run_id, seq=seq)

        run = self._runs.get(run_id)
        if run is None:
            if event_type not in ("agent_started", "agent_cancelled"):
                raise fail(
                    "a run's first event must be agent_started"
                    " (or a lone agent_cancelled for a queued run)",
                    "first_event",
                )
        else:
            if run.terminal is not None:
                raise fail(f"event after the run's terminal {run.terminal}", "after_terminal")
            if thread_id != run.thread_id:
                raise fail(
                    f"thread_id {thread_id!r} differs from the run's {run.thread_id!r}",
                    "thread_mismatch",
                )
            if trace_id != run.trace_id:
                raise fail(
                    f"trace_id {trace_id!r} differs from the run's {run.trace_id!r}",
                    "trace_mismatch",
                )
            if event_type == "agent_started":
                raise fail("agent_started seen twice", "duplicate_start")
        if event_type == "tool_executing":
            if run is not None and data["call_id"] in run.call_ids:
                raise fail(f"call_id {data['call_id']!r} reused in the run", "duplicate_call_id")
        elif event_type == "tool_completed":
            open_name = run.open_calls.get(data["call_id"]) if run is not None else None
            if open_name is None:
                raise fail(
                    f"call_id {data['call_id']!r} has no open tool_executing", "unmatched_tool"
                )
            if open_name != data["tool_name"]:
                raise fail(
                    f"call_id {data['call_id']!r} was executing {open_name!r},"
                    f" completed as {data['tool_name']!r}",
                    "unmatched_tool",
                )
        elif event_type in TERMINAL_EVENTS and run is not None and run.open_calls:
            raise fail(
                f"tool call(s) still open at the terminal event: {sorted(run.open_calls)!r}",
                "unclosed_tool",
            )

        # Commit.
        if run is None:
            run = _RunState(thread_id=thread_id, trace_id=trace_id, first_seq=seq, last_seq=seq)
            self._runs[run_id] = run
        run.last_seq = seq
        run.event_types.append(event_type)
        if event_type == "tool_executing":
            run.tool_calls += 1
            run.call_ids.add(data["call_id"])
            run.open_calls[data["call_id"]] = data["tool_name"]
        elif event_type == "tool_completed":
            del run.open_calls[data["call_id"]]
        elif event_type in TERMINAL_EVENTS:
            run.terminal = event_type
        self._next_seq = seq + 1
        self._events += 1
        if self._first_seen is None:
            self._first_seen = seq
        self._last_seen = seq


def check_lifecycle(
    frames: Iterable[Mapping[str, Any] | str | bytes],
    *,
    first_seq: int | None = None,
    require_terminal: bool = True,
    strict_seq: bool = True,
    strict_vocab: bool = True,
) -> LifecycleReport:
    """Check a whole recorded stream and return its report.

    Args:
        frames: Decoded frames, or raw JSON text/bytes as received on the socket.
        first_seq: See :class:`LifecycleChecker`.
        require_terminal: See :class:`LifecycleChecker`.
        strict_seq: See :class:`LifecycleChecker`.
        strict_vocab: See :class:`LifecycleChecker`.

    Raises:
        LifecycleViolation: at the first broken rule (``bad_frame`` for text that
            is not JSON).
    """
    checker = LifecycleChecker(
        first_seq=first_seq,
        require_terminal=require_terminal,
        strict_seq=strict_seq,
        strict_vocab=strict_vocab,
    )
    for index, raw in enumerate(frames):
        if isinstance(raw, str | bytes | bytearray):
            try:
                frame = json.loads(raw)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise LifecycleViolation(
                    f"frame #{index} is not valid JSON: {exc}", rule="bad_frame"
                ) from None
        else:
            frame = raw
        checker.feed(frame)
    return checker.finish()
