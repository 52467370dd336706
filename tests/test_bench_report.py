"""The benchmark report's targets table (``benchmarks/e2e/report.py``), from made-up points.

No server runs: the figures are invented, the rules under test are how measured points
become the rows of the issue's targets, and which comparisons are not targets.
"""

from __future__ import annotations

from typing import Any

from benchmarks.e2e import report

P99_TARGET = "netra (sqlite): p99 <= 5 ms at 10,000 events/s over 1,000 sessions"


def _latency(load: int, p99: float, sessions: int = 1000, **extra: Any) -> dict[str, Any]:
    return {
        "scenario": "latency",
        "kind": "netra",
        "label": "netra (sqlite)",
        "sessions": sessions,
        "offered_events_per_s": load,
        "lat_p99_ms": p99,
        **extra,
    }


def _throughput(batch: int, x_transport: float, x_peer: float) -> dict[str, Any]:
    return {
        "scenario": "throughput",
        "kind": "netra",
        "store": "sqlite",
        "batch": batch,
        "sessions": 100,
        "x_transport": x_transport,
        "core_x_transport": x_transport,
        "x_peer": x_peer,
        "core_x_peer": x_peer,
    }


def test_target_load_skipped_after_an_overload_is_a_target_not_met() -> None:
    """The p99 target's load, not offered because a lower one overloaded the server, is a
    row of the targets table, not met, saying why; lower loads are not target rows."""
    points = [
        _latency(1_000, 4.2),
        _latency(5_000, 273.5, overloaded=True, higher_loads_not_run=[10_000, 20_000]),
    ]
    rows = {t["target"]: t for t in report.targets(points, batch=100)}
    assert list(rows) == [P99_TARGET]
    assert rows[P99_TARGET]["met"] is False
    assert rows[P99_TARGET]["value"] == "not run: overloaded at 5,000"


def test_measured_target_load_is_judged_on_its_p99() -> None:
    """At 10,000 events/s over 1,000 sessions the p99 decides; the same load over 100
    sessions is not the target."""
    for p99, met in ((4.9, True), (5.1, False)):
        points = [_latency(10_000, p99), _latency(10_000, 1.0, sessions=100)]
        rows = {t["target"]: t for t in report.targets(points, batch=100)}
        assert list(rows) == [P99_TARGET]
        assert rows[P99_TARGET]["value"] == p99
        assert rows[P99_TARGET]["met"] is met


def test_single_event_frames_face_the_transport_and_batched_frames_the_peer() -> None:
    """netra with single-event frames is held to 0.8x the bare server; with batched frames
    to 1.5x the asyncio peer's single-event frames; the other pairings are not targets."""
    points = [_throughput(1, x_transport=0.9, x_peer=0.6), _throughput(100, 0.1, 1.4)]
    rows = report.targets(points, batch=100)
    assert [(r["goal"], r["value"], r["met"]) for r in rows] == [
        (0.8, 0.9, True),
        (1.5, 1.4, False),
    ]
    assert "bare trio-websocket (batch=1)" in rows[0]["target"]
    assert "asyncio peer" in rows[1]["target"]


def test_repetitions_keep_their_settings_and_take_the_median_of_figures() -> None:
    """Two repetitions of a point: settings equal in both stay as they are (ints, so the
    tables print S=100, not S=100.0); measured figures are their median."""
    rows = [
        {"scenario": "throughput", "config": "netra-sqlite", "sessions": 100, "batch": 1,
         "events_per_s": events, "complete": True}
        for events in (1_000.0, 3_000.0)
    ]  # fmt: skip
    (point,) = report.aggregate(rows)
    assert (point["sessions"], point["batch"]) == (100, 1)
    assert isinstance(point["sessions"], int)
    assert isinstance(point["batch"], int)
    assert point["events_per_s"] == 2_000.0
    assert point["repeats"] == 2
