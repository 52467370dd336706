"""The benchmark report's targets table (``benchmarks/e2e/report.py``), from made-up points.

No server runs: the figures are invented, the rules under test are how a measured point
becomes a target row.
"""

from __future__ import annotations

from typing import Any

from benchmarks.e2e import report


def _latency(load: int, p99: float, **extra: Any) -> dict[str, Any]:
    return {
        "scenario": "latency",
        "kind": "netra",
        "label": "netra (sqlite)",
        "sessions": 1000,
        "offered_events_per_s": load,
        "lat_p99_ms": p99,
        **extra,
    }


def test_loads_skipped_after_an_overload_are_targets_not_met() -> None:
    """A load the harness did not offer because a lower one overloaded the server is a row
    of the targets table, not met, saying why; measured loads are judged on their p99."""
    points = [
        _latency(1_000, 4.2),
        _latency(5_000, 273.5, overloaded=True, higher_loads_not_run=[10_000, 20_000]),
    ]
    rows = {t["target"]: t for t in report.targets(points, batch=100)}
    at = "netra (sqlite): p99 <= 5 ms at {:,} events/s over 1,000 sessions".format
    assert rows[at(1_000)]["met"] is True
    assert rows[at(5_000)]["met"] is False
    for load in (10_000, 20_000):
        assert rows[at(load)]["met"] is False
        assert rows[at(load)]["value"] == "not run: overloaded at 5,000"
