"""Smoke test of ``benchmarks/bench_store.py`` at tiny sizes: it runs, every stream it
produced passes the lifecycle checker, and SQLite stored every event. No timing assertion."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from netra_actors.testing import check_lifecycle

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_store.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_store", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_bench_store_runs_at_tiny_size(tmp_path: Path) -> None:
    bench = _load()
    results = await bench.measure(
        events=30, users=3, user_events=5, runs=2, repeat=1, root=tmp_path, warmup=False
    )
    labels = {label for label, _, _ in bench.STORES}
    for workload, users, streams_per_run in (
        (results.single, 1, 1),
        (results.many, 3, 1),
        (results.latency, 1, 1),
    ):
        assert {m.store for m in workload} == labels
        for m in workload:
            assert len(m.streams) == users * streams_per_run
            for stream in m.streams:
                report = check_lifecycle(stream, first_seq=1)
                assert report.events == len(stream)
            assert m.events == sum(len(s) for s in m.streams)
            if m.store == "memory":
                assert m.commits is None
                assert m.db_bytes is None
            else:
                # Every delivered event is in the file, and group commit counted its writes.
                assert m.stored_events == m.events
                assert m.db_bytes is not None
                assert m.db_bytes > 0
                assert m.commits is not None
                assert m.writes is not None
                assert m.writes >= m.commits > 0
    # (a): stream 30 is agent_started, agent_thinking, 30 pieces, agent_completed.
    assert all(m.events == 33 for m in results.single)
    # (c): one untimed run then 2 timed ones, 3 runs in one stream.
    for m in results.latency:
        assert len(m.latencies) == 2
        assert len(check_lifecycle(m.streams[0]).runs) == 3
    assert bench.check(results) == 3 * (1 + 3 + 1)
    assert "sqlite FULL" in bench.report(results)
