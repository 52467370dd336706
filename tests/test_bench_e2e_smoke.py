"""Smoke test of the end-to-end benchmark harness (``benchmarks/e2e``) at a tiny size.

Every server kind runs once (netra with and without multi-event frames, the bare
trio-websocket server, the asyncio peer, plain trio TCP), every event is delivered,
every stream passes the lifecycle checker, and every figure of every row is
present. No timing assertion. Skipped without the ``bench`` extra (``make test``
does not install it; ``make bench`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("websockets", minversion="13")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]

THROUGHPUT_FIELDS = (
    "events_per_s", "server_us_per_event", "clients_us_per_event", "server_util",
    "server_demand", "server_wait_frac", "client_util_max", "saturated", "events_per_frame",
    "lat_p50_ms", "lat_p99_ms", "lat_max_ms", "rss_after_kib", "x_peer",
)  # fmt: skip


@pytest.mark.network
def test_harness_runs_every_server_kind_at_tiny_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each scenario of the tiny profile completes with every stream checked and no loss."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.e2e.harness import run_bench
    from benchmarks.e2e.scenarios import PROFILES

    profile = PROFILES["tiny"]
    results = run_bench(profile, tmp_path / "out", tmp_path / "charts", log=lambda _: None)
    assert results["failures"] == []
    points = results["points"]

    throughput = [p for p in points if p["scenario"] == "throughput"]
    assert {p["config"] for p in throughput} == set(profile.throughput_configs)
    assert {p["kind"] for p in throughput} == {"netra", "trio-ws", "asyncio-peer", "trio-tcp"}
    assert {p["batch"] > 1 for p in throughput if p["kind"] == "netra"} == {True, False}
    for p in throughput:
        assert p["complete"], p.get("problems")
        assert p["events"] == p["expected_events"] > 0
        assert p["streams"] == p["checked_streams"] == p["sessions"]
        assert p["checked_events"] == p["events"]
        assert p["violations"] == []
        for field in THROUGHPUT_FIELDS:
            assert p[field] is not None, (p["config"], field)
    # The bare server batches every run it sends: fewer frames than events.
    batched = next(p for p in throughput if p["config"] == "trio-ws-b100")
    assert batched["frames"] < batched["events"]
    # Rows stand beside the baseline with the same batch size, when it ran.
    netra_batched = next(p for p in throughput if p["config"] == "netra-memory-b100")
    assert netra_batched["x_transport"] is not None

    (latency,) = [p for p in points if p["scenario"] == "latency"]
    assert latency["complete"], latency.get("problems")
    assert latency["events"] == latency["expected_events"] > 0
    assert None not in (latency["lat_p50_ms"], latency["lat_p99_ms"], latency["lat_max_ms"])

    (runs,) = [p for p in points if p["scenario"] == "runs"]
    assert runs["complete"], runs.get("problems")
    assert runs["runs"] == profile.runs_sessions * profile.runs_per_session
    assert runs["runs_per_s"] > 0

    (memory,) = [p for p in points if p["scenario"] == "memory"]
    assert memory["complete"]
    assert memory["kib_per_session"] is not None

    (soak,) = [p for p in points if p["scenario"] == "soak"]
    assert soak["complete"], soak.get("problems")
    assert len(soak["rss_phases_kib"]) == profile.soak_phases + 2  # before, warm-up, phases

    # Named for its profile: only the quick profile's (make bench) are "latest".
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.json", "tiny.md"]
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert saved["failures"] == []
    assert (
        "Throughput and server CPU per delivered event"
        in (tmp_path / "out" / "tiny.md").read_text()
    )
    assert {Path(p).name for p in results["charts"]} == {"throughput.png", "latency.png"}
