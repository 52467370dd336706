"""``netra-actors runs list`` and ``runs show`` over a store written by a real runtime.

The runs are made once per module by the demo agent, in process, against a
temporary data folder (``store="sqlite"``); the command then reads that folder
in process (``main(argv)``) and, once, through the installed entry point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from netra_actors import Config, Runtime
from netra_actors._cli import main
from netra_actors._config import ENV_PREFIX
from netra_actors._store import DB_FILENAME

SECRET = "runs-cli-test-secret-0123456789abcdef"

#: A timeline line: ``+{offset_ms:>8.1f} ms  seq {seq:<5} {type:<16} {summary}``.
TIMELINE = re.compile(
    r"^\+\s*(?P<offset>-?\d+\.\d) ms  seq (?P<seq>\d+)\s+(?P<type>\w+)(?P<rest>.*)$"
)


@attrs.frozen
class Stored:
    """The data folder, and what the runtime emitted for each named run."""

    data_dir: Path
    run_ids: dict[str, str]
    users: dict[str, str]
    events: dict[str, list[dict[str, Any]]]


async def _populate(data_dir: Path) -> Stored:
    config = Config(data_dir=data_dir, store="sqlite", secret=SECRET, shutdown_grace=2.0)
    run_ids: dict[str, str] = {}
    users: dict[str, str] = {}
    events: dict[str, list[dict[str, Any]]] = {}
    with trio.fail_after(20):
        async with Runtime(config) as runtime:
            for name, text in [
                ("calc", "calc 2+3"),
                ("tool_fails", "fail"),
                ("crash", "crash"),
                ("llm_fails", "llm fail"),
            ]:
                handle = await runtime.start_run("alice", text)
                run_ids[name], users[name] = handle.run_id, "alice"
                events[name] = [json.loads(e.frame) for e in await handle.collect()]

            # bob: a long tool cancelled while it runs.
            handle = await runtime.start_run("bob", "sleep 30")
            run_ids["cancelled"], users["cancelled"] = handle.run_id, "bob"
            events["cancelled"] = []
            async for event in handle.events():
                events["cancelled"].append(json.loads(event.frame))
                if event.type == "tool_executing":
                    await handle.cancel()

            # carol: a run cancelled while queued behind another on the same thread
            # (a lone agent_cancelled: the run never started).
            active = await runtime.start_run("carol", "sleep 30")
            run_ids["sleeps"], users["sleeps"] = active.run_id, "carol"
            queued = await runtime.start_run("carol", "calc 1+1")
            run_ids["queued"], users["queued"] = queued.run_id, "carol"
            await queued.cancel()
            events["queued"] = [json.loads(e.frame) for e in await queued.collect()]
            await active.cancel()
            events["sleeps"] = [json.loads(e.frame) for e in await active.collect()]
    return Stored(data_dir, run_ids, users, events)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    return trio.run(_populate, tmp_path_factory.mktemp("runs"))


@pytest.fixture(autouse=True)
def _no_netra_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``NETRA_ACTORS_*`` variables of the outer environment out of these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _list_json(capsys: pytest.CaptureFixture[str], stored: Stored, *flags: str) -> list[Any]:
    status, out, err = _run(
        capsys, "runs", "list", "--json", "--data-dir", str(stored.data_dir), *flags
    )
    assert (status, err) == (0, "")
    runs = json.loads(out)
    assert isinstance(runs, list)
    return runs


def _show(capsys: pytest.CaptureFixture[str], stored: Stored, name: str, *flags: str) -> str:
    status, out, err = _run(
        capsys, "runs", "show", stored.run_ids[name], "--data-dir", str(stored.data_dir), *flags
    )
    assert (status, err) == (0, "")
    return out


def _timeline(out: str) -> list[re.Match[str]]:
    return [m for line in out.splitlines() if (m := TIMELINE.match(line))]


# --- runs list -----------------------------------------------------------------------------------


def test_list_json_has_every_run_with_its_state(
    stored: Stored, capsys: pytest.CaptureFixture[str]
) -> None:
    """``runs list --json``: one object per run, with the state its terminal event implies."""
    runs = _list_json(capsys, stored)
    states = {run["run_id"]: run["state"] for run in runs}
    assert states == {
        stored.run_ids["calc"]: "completed",
        # A failing tool does not fail the run: the agent carried on.
        stored.run_ids["tool_fails"]: "completed",
        stored.run_ids["crash"]: "failed",
        stored.run_ids["llm_fails"]: "failed",
        stored.run_ids["cancelled"]: "cancelled",
        stored.run_ids["sleeps"]: "cancelled",
        stored.run_ids["queued"]: "cancelled",
    }
    by_id = {run["run_id"]: run for run in runs}
    calc = by_id[stored.run_ids["calc"]]
    assert calc["user_id"] == "alice"
    assert calc["text"] == "calc 2+3"
    assert calc["usage"]["prompt_tokens"] > 0
    assert by_id[stored.run_ids["crash"]]["error"]["type"] == "agent_error"
    # alice's runs, newest first.
    alice = [run["run_id"] for run in runs if run["user_id"] == "alice"]
    assert alice == [stored.run_ids[n] for n in ("llm_fails", "crash", "tool_fails", "calc")]


def test_list_filters_by_user_and_state(stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    """``--user`` and ``--state`` filter, alone and together; no match is an empty array."""
    bob = _list_json(capsys, stored, "--user", "bob")
    assert [run["run_id"] for run in bob] == [stored.run_ids["cancelled"]]

    failed = _list_json(capsys, stored, "--state", "failed")
    assert {run["run_id"] for run in failed} == {
        stored.run_ids["crash"],
        stored.run_ids["llm_fails"],
    }
    assert {run["state"] for run in failed} == {"failed"}

    cancelled = _list_json(capsys, stored, "--state", "cancelled", "--user", "carol")
    assert {run["run_id"] for run in cancelled} == {
        stored.run_ids["sleeps"],
        stored.run_ids["queued"],
    }

    assert _list_json(capsys, stored, "--user", "alice", "--state", "cancelled") == []
    assert _list_json(capsys, stored, "--user", "nobody") == []


def test_list_limit_keeps_the_newest(stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    everything = _list_json(capsys, stored)
    assert _list_json(capsys, stored, "--limit", "2") == everything[:2]


def test_list_refuses_an_unknown_state_and_a_bad_limit(
    stored: Stored, capsys: pytest.CaptureFixture[str]
) -> None:
    for flags in (["--state", "done"], ["--limit", "0"], ["--limit", "many"]):
        with pytest.raises(SystemExit) as exc_info:
            main(["runs", "list", "--data-dir", str(stored.data_dir), *flags])
        assert exc_info.value.code == 2
        assert "usage:" in capsys.readouterr().err


def test_list_table_has_a_row_per_run(stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    """The table: a header, then per run its id, user, thread, state, UTC start, duration,
    agent and error type."""
    status, out, err = _run(capsys, "runs", "list", "--data-dir", str(stored.data_dir))
    assert (status, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["RUN", "USER", "THREAD", "STATE"]
    assert "ERROR" in header
    assert len(rows) == len(stored.run_ids)
    cells = {row.split()[0]: row.split() for row in rows}
    crash = cells[stored.run_ids["crash"]]
    assert crash[1:4] == ["alice", "main", "failed"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", crash[4])
    assert crash[-2:] == ["demo", "agent_error"]
    assert cells[stored.run_ids["llm_fails"]][-1] == "llm_error"
    calc = cells[stored.run_ids["calc"]]
    assert calc[3] == "completed"
    assert calc[-1] == "-"
    assert re.fullmatch(r"\d+\.\d", calc[5])
    assert calc[6] == "ms"
    # The run cancelled while queued never started: no duration (its agent was recorded
    # when it was accepted).
    queued = cells[stored.run_ids["queued"]]
    assert queued[1:4] == ["carol", "main", "cancelled"]
    assert queued[5:] == ["-", "demo", "-"]


def test_list_with_no_match_says_so(stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(
        capsys, "runs", "list", "--user", "nobody", "--data-dir", str(stored.data_dir)
    )
    assert (status, out) == (0, "(no runs)\n")


# --- runs show -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["calc", "tool_fails", "crash", "llm_fails", "cancelled", "sleeps", "queued"]
)
def test_show_timeline_lists_every_event_in_order(
    stored: Stored, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """One line per event, in ``seq`` order, exactly the events the runtime emitted, with
    offsets from the start of the run that never go back."""
    out = _show(capsys, stored, name)
    lines = _timeline(out)
    emitted = stored.events[name]
    assert [int(m["seq"]) for m in lines] == [e["seq"] for e in emitted]
    assert [m["type"] for m in lines] == [e["type"] for e in emitted]
    offsets = [float(m["offset"]) for m in lines]
    assert offsets == sorted(offsets)
    assert offsets[0] >= 0.0
    assert f"run       {stored.run_ids[name]}" in out
    assert f"user      {stored.users[name]}" in out
    assert f"events    {len(emitted)} (seq {emitted[0]['seq']}-{emitted[-1]['seq']})" in out


def test_show_header_and_tool_durations(stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    """The header names the run, its trace and usage; each tool call shows its status and
    ``duration_ms`` on its timeline line and in the tools block."""
    out = _show(capsys, stored, "calc")
    header = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in out.split("\n\n")[0].splitlines()
    )
    started = stored.events["calc"][0]
    completed = next(e for e in stored.events["calc"] if e["type"] == "tool_completed")
    assert header["state"] == "completed"
    assert header["agent"] == "demo"
    assert header["thread"] == "main"
    assert header["text"] == '"calc 2+3"'
    assert header["trace id"] == started["trace_id"]
    assert header["error"] == "-"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", header["started"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", header["ended"])
    assert header["duration"].endswith(" ms")
    usage = stored.events["calc"][-1]["data"]["usage"]
    assert header["usage"] == " ".join(f"{k}={v}" for k, v in usage.items())

    data = completed["data"]
    duration = f"{data['duration_ms']:.1f} ms"
    tool_line = next(m for m in _timeline(out) if m["type"] == "tool_completed")
    assert f"calculator {data['call_id']} ok in {duration} -> 5" in tool_line["rest"]
    tools = out.split("tools (1 call)\n", 1)[1].splitlines()
    assert tools[0].split() == ["calculator", data["call_id"], "ok", *duration.split()]

    final = next(m for m in _timeline(out) if m["type"] == "agent_completed")
    assert final["rest"].strip() == 'final: "2+3 = 5"'


def test_show_failed_tool_and_failed_run(
    stored: Stored, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing tool's error is on its line; a failed run shows its error in the header
    and on its ``agent_error`` line."""
    out = _show(capsys, stored, "tool_fails")
    tool_line = next(m for m in _timeline(out) if m["type"] == "tool_completed")
    assert "fail call_" in tool_line["rest"]
    completed = next(e for e in stored.events["tool_fails"] if e["type"] == "tool_completed")
    duration = f"{completed['data']['duration_ms']:.1f} ms"
    assert tool_line["rest"].endswith(f" error in {duration}: tool_error: failure on request")
    assert re.search(r"\n  fail\s+call_\w+\s+error\s+\d+\.\d ms\n?$", out)

    out = _show(capsys, stored, "crash")
    message = "agent_error: RuntimeError: the demo agent crashed on request"
    assert f"error     {message}\n" in out
    assert "state     failed\n" in out
    last = _timeline(out)[-1]
    assert last["type"] == "agent_error"
    assert last["rest"].strip() == message
    assert "tools (" not in out

    out = _show(capsys, stored, "llm_fails")
    assert "error     llm_error: the scripted model failed on request\n" in out


def test_show_cancelled_runs(stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    """A cancelled run shows the cancelled tool and the reason; a run cancelled while
    queued has no start, one event at offset 0."""
    out = _show(capsys, stored, "cancelled")
    lines = _timeline(out)
    assert lines[-1]["rest"].strip() == "reason: client"
    tool_line = next(m for m in lines if m["type"] == "tool_completed")
    assert "sleep call_" in tool_line["rest"]
    assert " cancelled in " in tool_line["rest"]
    assert re.search(r"\n  sleep\s+call_\w+\s+cancelled\s+\d+\.\d ms\n?$", out)

    out = _show(capsys, stored, "queued")
    assert "started   -\n" in out
    assert "duration  -\n" in out
    [only] = _timeline(out)
    assert (only["type"], float(only["offset"])) == ("agent_cancelled", 0.0)


def test_show_json_is_the_run_and_its_frames(
    stored: Stored, capsys: pytest.CaptureFixture[str]
) -> None:
    """``runs show --json``: the run as ``runs list`` has it, and the frames as sent."""
    listed = {run["run_id"]: run for run in _list_json(capsys, stored)}
    for name in ("calc", "crash", "cancelled"):
        shown = json.loads(_show(capsys, stored, name, "--json"))
        assert set(shown) == {"run", "events"}
        assert shown["run"] == listed[stored.run_ids[name]]
        assert shown["events"] == stored.events[name]
    crash = json.loads(_show(capsys, stored, "crash", "--json"))
    assert crash["run"]["error"] == {
        "type": "agent_error",
        "message": "RuntimeError: the demo agent crashed on request",
    }


def test_show_unknown_run_exits_1(stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    for flags in ([], ["--json"]):
        status, out, err = _run(
            capsys, "runs", "show", "run_nope", "--data-dir", str(stored.data_dir), *flags
        )
        assert (status, out) == (1, "")
        assert "no run 'run_nope'" in err


# --- no store ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["runs", "list"], ["runs", "list", "--json"], ["runs", "show", "run_x"]]
)
def test_missing_database_exits_1_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """A read command never creates a store: an empty or missing folder stays as it was."""
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    for folder in (empty, missing):
        status, out, err = _run(capsys, *argv, "--data-dir", str(folder))
        assert (status, out) == (1, "")
        assert f"no run store at {folder / DB_FILENAME}" in err
    assert list(empty.iterdir()) == []
    assert not missing.exists()


def test_a_file_that_is_not_a_database_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / DB_FILENAME).write_bytes(b"not a database at all, " * 10)
    status, out, err = _run(capsys, "runs", "list", "--data-dir", str(tmp_path))
    assert (status, out) == (1, "")
    assert f"cannot read {tmp_path / DB_FILENAME}" in err


# --- the installed command -------------------------------------------------------------------------


def _command() -> list[str]:
    script = Path(sys.executable).with_name("netra-actors")
    return [str(script)] if script.exists() else [sys.executable, "-m", "netra_actors"]


def _subprocess(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        [*_command(), *argv], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_the_entry_point_lists_and_shows_runs(stored: Stored, tmp_path: Path) -> None:
    """The console script (or ``python -m netra_actors``) reads the same store."""
    listed = _subprocess(
        "runs", "list", "--json", "--state", "failed", "--data-dir", str(stored.data_dir)
    )
    assert (listed.returncode, listed.stderr) == (0, "")
    assert {run["run_id"] for run in json.loads(listed.stdout)} == {
        stored.run_ids["crash"],
        stored.run_ids["llm_fails"],
    }

    shown = _subprocess("runs", "show", stored.run_ids["calc"], "--data-dir", str(stored.data_dir))
    assert (shown.returncode, shown.stderr) == (0, "")
    assert [int(m["seq"]) for m in _timeline(shown.stdout)] == [
        e["seq"] for e in stored.events["calc"]
    ]

    missing = _subprocess("runs", "list", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 1
    assert "no run store" in missing.stderr
    assert not (tmp_path / "none").exists()
