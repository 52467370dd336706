"""Smoke test of ``benchmarks/bench_rounds.py`` and ``benchmarks/bench_idle_memory.py``.

Each script runs as a subprocess at a tiny size (servers on 127.0.0.1 only) and must
exit 0 with sane figures in its ``--json`` output: every run ended and delivered the
events it should, memory grew by a positive amount per session. No timing assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

#: Events (those with a ``seq``) of one demo run: ``stream N`` is agent_started,
#: agent_thinking, N partial_result, agent_completed; the calculator question is
#: agent_started, 2 agent_thinking, tool_executing, tool_completed, agent_thinking,
#: 3 partial_result, agent_completed.
CALC_EVENTS = 10


def stream_events(n: int) -> int:
    return n + 3


def run_script(name: str, *args: str) -> tuple[int, dict[str, Any]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.network
@pytest.mark.parametrize(("stream", "store"), [(5, "sqlite"), (0, "memory")])
def test_bench_rounds_every_run_ends(stream: int, store: str) -> None:
    clients, rounds = 2, 1
    code, result = run_script(
        "bench_rounds.py",
        *("--clients", str(clients), "--stream", str(stream), "--rounds", str(rounds)),
        *("--store", store),
    )
    assert code == 0, result
    assert result["ok"], result["problems"]
    per_round = CALC_EVENTS + (stream_events(stream) if stream else 0)
    runs = clients * rounds * (2 if stream else 1)
    assert result["runs"] == result["ended_runs"] == result["completed_runs"] == runs
    assert result["errored_runs"] == result["cancelled_runs"] == 0
    assert result["events"] == clients * rounds * per_round
    assert result["server_cpu_s"] >= 0
    assert result["server_us_per_event"] >= 0
    assert result["server_ms_per_run"] >= 0
    assert result["events_per_s"] > 0
    assert [t["role"] for t in result["threads"]].count("main") == 1
    assert result["server_exit_status"] == 0


@pytest.mark.network
def test_bench_rounds_fails_when_a_client_misses_runs() -> None:
    """A client the server turns away never sees its runs end: exit status 1."""
    code, result = run_script(
        "bench_rounds.py",
        *("--clients", "3", "--stream", "5", "--rounds", "1", "--store", "memory"),
        "--server-arg=--max-connections=1",
    )
    assert code == 1
    assert not result["ok"]
    assert result["ended_runs"] == 2 < result["runs"] == 6
    assert any("did not see every run end" in p for p in result["problems"])


@pytest.mark.network
@pytest.mark.parametrize("trace", [False, True])
def test_bench_idle_memory_grows_per_session(trace: bool) -> None:
    sessions = 5
    code, result = run_script(
        "bench_idle_memory.py", "--sessions", str(sessions), *(["--trace"] if trace else [])
    )
    assert code == 0, result
    assert result["ok"], result["problems"]
    assert result["sessions_opened"] == result["connections_opened"] == sessions
    assert result["rss_kib_per_session"] > 0
    assert result["tasks_per_session"] > 0
    assert result["tasks_after"] > result["tasks_before"]
    if trace:
        assert result["traced_kib_per_session"] > 0
        assert result["by_file"]
        assert result["by_line"]
        assert sum(result["tasks_per_session_by_name"].values()) == pytest.approx(
            result["tasks_per_session"]
        )
