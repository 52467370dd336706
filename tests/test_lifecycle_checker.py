"""Tests of the public lifecycle checker (netra_actors.testing).

The checker is the executable form of the event-ordering contract, so each
rule gets one passing and one failing example, and a property test checks that
valid generated streams pass while every breaking mutation of them is caught.
"""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netra_actors.testing import (
    AGENT_ERROR_TYPES,
    CANCEL_REASONS,
    EVENT_TYPES,
    TERMINAL_EVENTS,
    TOOL_ERROR_TYPES,
    TOOL_STATUSES,
    LifecycleChecker,
    LifecycleViolation,
    check_lifecycle,
)

Frame = dict[str, Any]

TRACE_1 = "0af7651916cd43dd8448eb211c80319c"
TRACE_2 = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "b7ad6b7169203331"

DEFAULT_DATA: dict[str, Frame] = {
    "agent_started": {"agent_name": "assistant", "user_id": "u1", "text": "hi"},
    "agent_thinking": {"reasoning": "hmm", "step": 1},
    "tool_executing": {"call_id": "c1", "tool_name": "search", "parameters": {"q": "x"}},
    "tool_completed": {
        "call_id": "c1",
        "tool_name": "search",
        "status": "ok",
        "results": [1],
        "duration_ms": 1.5,
    },
    "partial_result": {"text": "par"},
    "agent_completed": {"status": "ok", "final_response": "done"},
    "agent_error": {"error": {"type": "llm_error", "message": "boom"}},
    "agent_cancelled": {"reason": "client"},
}


def ev(
    kind: str,
    seq: int,
    run: str = "r1",
    thread: str = "t1",
    trace: str = TRACE_1,
    **data: Any,
) -> Frame:
    """Build one event frame; ``data`` overrides the type's default data fields."""
    return {
        "type": kind,
        "seq": seq,
        "run_id": run,
        "thread_id": thread,
        "ts": 1700000000.0 + seq,
        "trace_id": trace,
        "span_id": SPAN,
        "data": {**DEFAULT_DATA.get(kind, {}), **data},
    }


def ready(last_seq: int = 0, session_id: str = "s1") -> Frame:
    return {
        "type": "session_ready",
        "session_id": session_id,
        "user_id": "u1",
        "last_seq": last_seq,
        "protocol": 1,
    }


def tool_run(start: int = 1, run: str = "r1") -> list[Frame]:
    return [
        ev("agent_started", start, run),
        ev("agent_thinking", start + 1, run),
        ev("tool_executing", start + 2, run),
        ev("tool_completed", start + 3, run),
        ev("partial_result", start + 4, run),
        ev("agent_completed", start + 5, run),
    ]


def violation(frames: list[Any], **options: Any) -> LifecycleViolation:
    with pytest.raises(LifecycleViolation) as info:
        check_lifecycle(frames, **options)
    return info.value


# --- valid streams ------------------------------------------------------------------------------


def test_valid_tool_run_passes_with_correct_report() -> None:
    """A started/thinking/tool/partial/completed run passes and the report counts it."""
    report = check_lifecycle([ready(0), *tool_run()])
    assert report.events == 6
    assert (report.first_seq, report.last_seq) == (1, 6)
    summary = report.runs["r1"]
    assert summary.event_types == (
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "agent_completed",
    )
    assert summary.terminal == "agent_completed"
    assert summary.tool_calls == 1
    assert summary.thread_id == "t1"
    assert (summary.first_seq, summary.last_seq) == (1, 6)
    assert report.terminal_counts() == {
        "agent_completed": 1,
        "agent_error": 0,
        "agent_cancelled": 0,
    }


def test_interleaved_runs_of_two_threads_pass() -> None:
    """Two runs of different threads may interleave freely on one gap-free seq."""
    frames = [
        ready(10),
        ev("agent_started", 11, "a", "t1", TRACE_1),
        ev("agent_started", 12, "b", "t2", TRACE_2),
        ev("tool_executing", 13, "b", "t2", TRACE_2),
        ev("tool_executing", 14, "a", "t1", TRACE_1),
        ev(
            "tool_completed",
            15,
            "a",
            "t1",
            TRACE_1,
            status="error",
            error={"type": "tool_error", "message": "x"},
        ),
        ev("tool_completed", 16, "b", "t2", TRACE_2),
        ev("agent_error", 17, "a", "t1", TRACE_1),
        ev("agent_completed", 18, "b", "t2", TRACE_2),
    ]
    report = check_lifecycle(frames)
    assert report.events == 8
    assert report.terminal_counts() == {
        "agent_completed": 1,
        "agent_error": 1,
        "agent_cancelled": 0,
    }
    assert report.runs["a"].thread_id == "t1"
    assert report.runs["b"].thread_id == "t2"


def test_lone_queued_cancel_passes() -> None:
    """A run cancelled while queued has a lone agent_cancelled and nothing else."""
    report = check_lifecycle([ready(0), ev("agent_cancelled", 1, reason="client")])
    assert report.runs["r1"].event_types == ("agent_cancelled",)
    assert report.terminal_counts()["agent_cancelled"] == 1


def test_raw_json_text_and_bytes_are_decoded() -> None:
    """check_lifecycle accepts frames as JSON str or bytes as received on the socket."""
    frames: list[Any] = [json.dumps(ready(0)), *(json.dumps(f) for f in tool_run())]
    frames[-1] = frames[-1].encode()
    assert check_lifecycle(frames).events == 6


def test_invalid_json_text_is_bad_frame() -> None:
    """Text that is not JSON is reported, not crashed on."""
    assert violation(["{not json"]).rule == "bad_frame"


def test_non_event_frames_are_ignored() -> None:
    """run_accepted, pong, error and unknown future non-event frames do not affect the checks."""
    frames = tool_run()
    frames.insert(
        0, {"type": "run_accepted", "run_id": "r1", "thread_id": "t1", "client_msg_id": None}
    )
    frames.insert(3, {"type": "pong"})
    frames.insert(5, {"type": "error", "code": "bad_frame", "message": "nope"})
    frames.insert(6, {"type": "some_future_frame", "from_seq": 1, "to_seq": 2})
    assert check_lifecycle([ready(0), *frames]).events == 6


def test_incremental_feed_exposes_progress() -> None:
    """feed() updates events_seen, runs and run_events() as frames arrive."""
    checker = LifecycleChecker()
    for frame in tool_run()[:3]:
        checker.feed(frame)
    assert checker.events_seen == 3
    assert checker.run_events("r1") == ["agent_started", "agent_thinking", "tool_executing"]
    assert checker.runs["r1"].terminal is None
    with pytest.raises(KeyError):
        checker.run_events("nope")


def test_feed_that_raises_leaves_state_unchanged() -> None:
    """A rejected frame does not change the checker, so feeding can go on after it."""
    checker = LifecycleChecker()
    frames = tool_run()
    checker.feed(frames[0])
    with pytest.raises(LifecycleViolation):
        checker.feed(frames[2])  # seq gap
    for frame in frames[1:]:
        checker.feed(frame)
    assert checker.finish().events == 6


def test_constants_match_protocol_vocabularies() -> None:
    """The exported vocabularies are the protocol v1 ones."""
    assert len(EVENT_TYPES) == 8
    assert TERMINAL_EVENTS < EVENT_TYPES
    assert sorted(TOOL_STATUSES) == ["cancelled", "error", "ok", "timeout"]
    assert "step_limit" in AGENT_ERROR_TYPES
    assert sorted(CANCEL_REASONS) == ["client", "interrupted", "shutdown"]
    assert "bad_result" in TOOL_ERROR_TYPES


def test_violation_carries_location_and_pickles() -> None:
    """A violation names its rule, run and seq, and survives pickling."""
    exc = violation([*tool_run()[:2], ev("agent_thinking", 4)])
    assert (exc.rule, exc.run_id, exc.seq) == ("seq_gap", "r1", 4)
    assert "seq_gap" in str(exc)
    clone = pickle.loads(pickle.dumps(exc))
    assert (clone.rule, clone.run_id, clone.seq, str(clone)) == (
        exc.rule,
        exc.run_id,
        exc.seq,
        str(exc),
    )


# --- sequence rules -----------------------------------------------------------------------------


def test_seq_gap_is_rejected() -> None:
    """Each event's seq is exactly the previous one + 1."""
    frames = tool_run()
    del frames[2]
    assert violation(frames).rule == "seq_gap"


def test_duplicate_seq_is_rejected() -> None:
    """A repeated seq (a replayed duplicate) is rejected."""
    frames = tool_run()
    frames.insert(2, frames[1])
    assert violation(frames).rule == "seq_gap"


def test_session_ready_last_seq_mismatch_is_rejected() -> None:
    """The first event after session_ready has seq last_seq + 1."""
    exc = violation([ready(5), *tool_run(start=1)])
    assert (exc.rule, exc.seq) == ("seq_gap", 1)


def test_first_seq_option_pins_start_without_session_ready() -> None:
    """With first_seq set and no session_ready, the first event must have that seq."""
    assert check_lifecycle(tool_run(start=7)).first_seq == 7
    assert violation(tool_run(start=7), first_seq=1).rule == "seq_gap"


def test_new_session_ready_restarts_the_stream() -> None:
    """A later session_ready (reconnect) pins the next seq to its last_seq + 1."""
    frames = [ready(0, "s1"), *tool_run(1, "r1"), ready(0, "s2"), *tool_run(1, "r2")]
    assert check_lifecycle(frames).events == 12
    frames = [ready(0, "s1"), *tool_run(1, "r1"), ready(6, "s1"), *tool_run(7, "r2")]
    assert check_lifecycle(frames).events == 12


def test_non_strict_seq_allows_gaps_but_not_going_back() -> None:
    """With strict_seq=False seq need only increase and session_ready is not pinned."""
    frames = tool_run()
    for i, frame in enumerate(frames):
        frame["seq"] = 10 * (i + 1)
    assert check_lifecycle([ready(0), *frames], strict_seq=False).events == 6
    frames[3]["seq"] = 20
    assert violation(frames, strict_seq=False).rule == "seq_gap"


# --- run rules ----------------------------------------------------------------------------------


def test_first_event_must_be_agent_started() -> None:
    """A run's first event is agent_started (unless a lone queued cancel)."""
    exc = violation([ev("agent_thinking", 1)])
    assert (exc.rule, exc.run_id, exc.seq) == ("first_event", "r1", 1)


def test_agent_started_twice_is_rejected() -> None:
    """agent_started happens at most once per run."""
    assert violation([ev("agent_started", 1), ev("agent_started", 2)]).rule == "duplicate_start"


def test_event_after_terminal_is_rejected() -> None:
    """Nothing of a run follows its terminal event."""
    frames = [*tool_run(), ev("partial_result", 7)]
    assert violation(frames).rule == "after_terminal"


def test_second_terminal_is_rejected() -> None:
    """A run has exactly one terminal event."""
    frames = [*tool_run(), ev("agent_error", 7)]
    assert violation(frames).rule == "after_terminal"


def test_event_after_lone_cancel_is_rejected() -> None:
    """A queued run's lone agent_cancelled is still terminal: it cannot start afterwards."""
    assert violation([ev("agent_cancelled", 1), ev("agent_started", 2)]).rule == "after_terminal"


def test_thread_mismatch_is_rejected() -> None:
    """All events of a run carry the run's thread_id."""
    frames = [ev("agent_started", 1), ev("agent_thinking", 2, thread="t2")]
    assert violation(frames).rule == "thread_mismatch"


def test_trace_mismatch_is_rejected() -> None:
    """All events of a run carry the run's trace_id."""
    frames = [ev("agent_started", 1), ev("agent_thinking", 2, trace=TRACE_2)]
    assert violation(frames).rule == "trace_mismatch"


def test_missing_terminal_at_finish_is_rejected() -> None:
    """finish() fails when a run has no terminal event."""
    exc = violation(tool_run()[:-1])
    assert (exc.rule, exc.run_id) == ("missing_terminal", "r1")


def test_require_terminal_false_allows_open_runs() -> None:
    """With require_terminal=False an unfinished run is reported, not rejected."""
    report = check_lifecycle(tool_run()[:-1], require_terminal=False)
    assert report.runs["r1"].terminal is None
    assert report.terminal_counts() == {
        "agent_completed": 0,
        "agent_error": 0,
        "agent_cancelled": 0,
    }


# --- tool rules ---------------------------------------------------------------------------------


def test_tool_completed_without_executing_is_rejected() -> None:
    """tool_completed needs an open tool_executing with its call_id."""
    frames = [ev("agent_started", 1), ev("tool_completed", 2)]
    assert violation(frames).rule == "unmatched_tool"


def test_tool_name_mismatch_is_rejected() -> None:
    """tool_completed has the tool_name of its tool_executing."""
    frames = [
        ev("agent_started", 1),
        ev("tool_executing", 2),
        ev("tool_completed", 3, tool_name="other"),
    ]
    assert violation(frames).rule == "unmatched_tool"


def test_tool_completed_twice_is_rejected() -> None:
    """A call completes once: the second tool_completed has no open call."""
    frames = [*tool_run()[:4], ev("tool_completed", 5)]
    assert violation(frames).rule == "unmatched_tool"


def test_unclosed_tool_at_terminal_is_rejected() -> None:
    """Every open tool call completes before the run's terminal event."""
    frames = [ev("agent_started", 1), ev("tool_executing", 2), ev("agent_cancelled", 3)]
    assert violation(frames).rule == "unclosed_tool"


def test_duplicate_call_id_is_rejected() -> None:
    """A call_id is used once per run, even after its first call completed."""
    frames = [*tool_run()[:4], ev("tool_executing", 5)]
    assert violation(frames).rule == "duplicate_call_id"


def test_same_call_id_in_two_runs_is_allowed() -> None:
    """call_id uniqueness is per run, not per stream."""
    frames = [*tool_run(1, "a"), *tool_run(7, "b")]
    assert check_lifecycle(frames).events == 12


# --- field rules --------------------------------------------------------------------------------


def test_bad_trace_id_is_rejected() -> None:
    """trace_id is 32 lowercase hex digits."""
    assert violation([ev("agent_started", 1, trace=TRACE_1.upper())]).rule == "bad_field"
    assert violation([ev("agent_started", 1, trace="abc")]).rule == "bad_field"


def test_bad_envelope_fields_are_rejected() -> None:
    """seq is an int >= 1 (not bool), ts a number, span_id 16 hex digits, data an object."""
    for key, value in [
        ("seq", 0),
        ("seq", True),
        ("seq", "1"),
        ("ts", "now"),
        ("span_id", "xyz"),
        ("data", []),
        ("run_id", ""),
        ("thread_id", None),
    ]:
        frame = ev("agent_started", 1)
        frame[key] = value
        assert violation([frame]).rule == "bad_field", (key, value)
    frame = ev("agent_started", 1)
    del frame["ts"]
    assert violation([frame]).rule == "bad_field"


def test_unknown_event_type_is_rejected() -> None:
    """A frame with a seq and an unknown type is a violation."""
    frames = [ev("agent_started", 1), ev("agent_dreaming", 2)]
    exc = violation(frames)
    assert (exc.rule, exc.seq) == ("unknown_event", 2)


def test_missing_data_field_is_rejected() -> None:
    """Each event type has its required data fields with the right types."""
    cases: list[tuple[str, str]] = [
        ("agent_started", "agent_name"),
        ("agent_thinking", "step"),
        ("tool_executing", "parameters"),
        ("tool_completed", "duration_ms"),
        ("tool_completed", "results"),
        ("partial_result", "text"),
        ("agent_completed", "final_response"),
        ("agent_error", "error"),
        ("agent_cancelled", "reason"),
    ]
    for kind, key in cases:
        frame = ev(kind, 1)
        del frame["data"][key]
        assert violation([frame]).rule == "bad_field", (kind, key)


def test_failed_tool_requires_error_object() -> None:
    """A tool_completed with status other than ok carries error {type, message}."""
    frame = ev("tool_completed", 3, status="timeout")
    assert violation([ev("agent_started", 1), ev("tool_executing", 2), frame]).rule == "bad_field"


def test_negative_duration_is_rejected() -> None:
    """tool_completed.duration_ms is a number >= 0."""
    frames = [
        ev("agent_started", 1),
        ev("tool_executing", 2),
        ev("tool_completed", 3, duration_ms=-1),
    ]
    assert violation(frames).rule == "bad_field"


def test_agent_completed_status_must_be_ok() -> None:
    """agent_completed always has data.status == 'ok' (failures are agent_error)."""
    assert (
        violation([ev("agent_started", 1), ev("agent_completed", 2, status="error")]).rule
        == "bad_field"
    )


def test_bad_vocabulary_is_rejected() -> None:
    """Tool status, error types and cancel reasons come from the v1 vocabularies."""
    bad = [
        ev("agent_error", 2, error={"type": "oops", "message": "m"}),
        ev("agent_cancelled", 2, reason="bored"),
    ]
    for frame in bad:
        assert violation([ev("agent_started", 1), frame]).rule == "vocabulary"
    tool_bad = [
        ev("tool_completed", 3, status="maybe", error={"type": "tool_error", "message": "m"}),
        ev("tool_completed", 3, status="error", error={"type": "oops", "message": "m"}),
    ]
    for frame in tool_bad:
        assert (
            violation([ev("agent_started", 1), ev("tool_executing", 2), frame]).rule == "vocabulary"
        )


def test_strict_vocab_false_allows_new_vocabulary() -> None:
    """With strict_vocab=False later-version vocabulary entries are accepted."""
    frames = [
        ev("agent_started", 1),
        ev("tool_executing", 2),
        ev("tool_completed", 3, status="skipped", error={"type": "quota", "message": "m"}),
        ev("agent_cancelled", 4, reason="bored"),
    ]
    assert check_lifecycle(frames, strict_vocab=False).events == 4


def test_malformed_session_ready_is_rejected() -> None:
    """session_ready.last_seq is an integer >= 0."""
    assert (
        violation([{"type": "session_ready", "session_id": "s", "last_seq": "3"}]).rule
        == "bad_field"
    )


# --- property: valid streams pass, broken ones are caught ---------------------------------------

RunEvents = list[tuple[str, Frame]]


@st.composite
def valid_run(draw: st.DrawFn) -> RunEvents:
    """One run's (type, data) events, valid on its own."""
    if draw(st.integers(0, 9)) == 0:
        return [("agent_cancelled", {"reason": draw(st.sampled_from(sorted(CANCEL_REASONS)))})]
    events: RunEvents = [("agent_started", dict(DEFAULT_DATA["agent_started"]))]
    open_calls: list[str] = []
    calls = 0
    for step in range(draw(st.integers(0, 8))):
        action = draw(st.sampled_from(["think", "open", "close", "partial"]))
        if action == "think":
            events.append(("agent_thinking", {"reasoning": "r", "step": step}))
        elif action == "partial":
            events.append(("partial_result", {"text": "p"}))
        elif action == "open" or not open_calls:
            call_id = f"c{calls}"
            calls += 1
            open_calls.append(call_id)
            events.append(
                (
                    "tool_executing",
                    {"call_id": call_id, "tool_name": f"tool{call_id}", "parameters": {}},
                )
            )
        else:
            call_id = open_calls.pop(draw(st.integers(0, len(open_calls) - 1)))
            events.append(_completed(call_id, draw(st.sampled_from(sorted(TOOL_STATUSES)))))
    terminal = draw(st.sampled_from(sorted(TERMINAL_EVENTS)))
    for call_id in open_calls:
        events.append(_completed(call_id, "cancelled" if terminal == "agent_cancelled" else "ok"))
    events.append((terminal, dict(DEFAULT_DATA[terminal])))
    return events


def _completed(call_id: str, status: str) -> tuple[str, Frame]:
    data: Frame = {
        "call_id": call_id,
        "tool_name": f"tool{call_id}",
        "status": status,
        "duration_ms": 2,
    }
    if status == "ok":
        data["results"] = {"n": 1}
    else:
        data["error"] = {
            "type": "cancelled" if status == "cancelled" else "tool_error",
            "message": "m",
        }
    return ("tool_completed", data)


@st.composite
def valid_stream(draw: st.DrawFn) -> tuple[int, list[Frame]]:
    """A session's last_seq and its events: up to three runs interleaved, seq gap-free."""
    runs = draw(st.lists(valid_run(), min_size=1, max_size=3))
    cursors = [0] * len(runs)
    events: list[Frame] = []
    last_seq = draw(st.integers(0, 1000))
    while pending := [i for i, run in enumerate(runs) if cursors[i] < len(run)]:
        i = draw(st.sampled_from(pending))
        kind, data = runs[i][cursors[i]]
        cursors[i] += 1
        frame = ev(kind, 0, f"run{i}", f"thread{i}", TRACE_1 if i % 2 else TRACE_2)
        frame["data"] = copy.deepcopy(data)
        events.append(frame)
    _renumber(events, last_seq)
    return last_seq, events


def _renumber(events: list[Frame], last_seq: int) -> list[Frame]:
    for offset, frame in enumerate(events, start=1):
        frame["seq"] = last_seq + offset
    return events


def _next_of_same_run(events: list[Frame], i: int) -> int | None:
    return next(
        (j for j in range(i + 1, len(events)) if events[j]["run_id"] == events[i]["run_id"]), None
    )


def _run_of(events: list[Frame], run_id: str) -> list[str]:
    return [e["type"] for e in events if e["run_id"] == run_id]


def _breaking_drops(events: list[Frame]) -> list[int]:
    """Indices whose removal (then renumbering) always breaks a lifecycle rule."""
    out = []
    for i, e in enumerate(events):
        if e["type"] in ("agent_thinking", "partial_result"):
            continue
        run = _run_of(events, e["run_id"])
        if run == ["agent_cancelled"]:
            continue  # the whole run vanishes
        if e["type"] == "agent_started" and run == ["agent_started", "agent_cancelled"]:
            continue  # what remains is a valid lone queued cancel
        out.append(i)
    return out


def _breaking_swaps(events: list[Frame]) -> list[tuple[int, int]]:
    """Pairs of consecutive same-run events whose exchange always breaks a lifecycle rule."""
    out = []
    for i, e in enumerate(events):
        j = _next_of_same_run(events, i)
        if j is None:
            continue
        f = events[j]
        same_call = (
            e["type"] == "tool_executing"
            and f["type"] == "tool_completed"
            and e["data"]["call_id"] == f["data"]["call_id"]
        )
        if e["type"] == "agent_started" or f["type"] in TERMINAL_EVENTS or same_call:
            out.append((i, j))
    return out


LIFECYCLE_RULES = {
    "first_event",
    "after_terminal",
    "unmatched_tool",
    "unclosed_tool",
    "missing_terminal",
}


@settings(max_examples=300, deadline=None)
@given(stream=valid_stream(), data=st.data())
def test_valid_streams_pass_and_mutations_are_caught(
    stream: tuple[int, list[Frame]], data: st.DataObject
) -> None:
    """Generated valid streams pass; dropping, duplicating or reordering events is caught."""
    last_seq, events = stream
    report = check_lifecycle([ready(last_seq), *events])
    assert report.events == len(events)
    assert sum(report.terminal_counts().values()) == len(report.runs)

    mutated = copy.deepcopy(events)
    kind = data.draw(
        st.sampled_from(["drop", "duplicate", "swap_adjacent", "drop_renumber", "swap_renumber"])
    )
    if kind == "drop":  # a hole in seq, or the stream's last terminal is missing
        candidates = list(range(len(mutated) - 1))  # any but the last leaves a hole
        if _run_of(mutated, mutated[-1]["run_id"]) != ["agent_cancelled"]:
            candidates.append(len(mutated) - 1)  # the last is a terminal its run needs
        if not candidates:
            return
        del mutated[data.draw(st.sampled_from(candidates))]
        expected = {"seq_gap", "missing_terminal"}
    elif kind == "duplicate":  # a replayed frame repeats its seq
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated.insert(i + 1, copy.deepcopy(mutated[i]))
        expected = {"seq_gap"}
    elif kind == "swap_adjacent":  # seq goes backwards
        if len(mutated) < 2:
            return
        i = data.draw(st.integers(0, len(mutated) - 2))
        mutated[i], mutated[i + 1] = mutated[i + 1], mutated[i]
        expected = {"seq_gap"}
    elif kind == "drop_renumber":  # seq is fine; the run's lifecycle is not
        candidates = _breaking_drops(mutated)
        if not candidates:
            return
        del mutated[data.draw(st.sampled_from(candidates))]
        _renumber(mutated, last_seq)
        expected = LIFECYCLE_RULES
    else:  # swap_renumber: two consecutive events of one run trade places
        pairs = _breaking_swaps(mutated)
        if not pairs:
            return
        i, j = data.draw(st.sampled_from(pairs))
        mutated[i], mutated[j] = mutated[j], mutated[i]
        _renumber(mutated, last_seq)
        expected = LIFECYCLE_RULES

    with pytest.raises(LifecycleViolation) as info:
        check_lifecycle([ready(last_seq), *mutated])
    assert info.value.rule in expected, (kind, info.value)


def test_resuming_session_ready_restarts_after_its_after_seq() -> None:
    """A resuming connection's stream continues from ``session_ready.after_seq + 1``."""
    frames = [ready(last_seq=9) | {"after_seq": 0}, *tool_run(1)]
    assert check_lifecycle(frames).events == 6
    assert violation([ready(last_seq=9) | {"after_seq": 2}, *tool_run(1)]).rule == "seq_gap"


def test_resume_gap_moves_the_expected_seq_to_the_oldest_kept() -> None:
    """After ``resume_gap`` the next event must be ``oldest_seq``; anything else is a gap."""
    gap = {"type": "resume_gap", "session_id": "s1", "oldest_seq": 5, "last_seq": 10}
    frames = [ready(last_seq=10) | {"after_seq": 4}, gap, *tool_run(5)]
    assert check_lifecycle(frames).first_seq == 5
    assert violation([ready(last_seq=10), gap, *tool_run(6)]).rule == "seq_gap"
    bad_gap = {"type": "resume_gap", "session_id": "s1", "oldest_seq": "x", "last_seq": 10}
    assert violation([ready(last_seq=10), bad_gap]).rule == "bad_field"
