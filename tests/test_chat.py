"""``netra-actors chat`` (netra_actors._chat): the terminal client.

End to end against a real server (``--once --json`` in-process and through the
console script, interactive under tmux when it is installed), and without one:
the drawing of recorded events (``RunView``), the routing of frames to the run
shown, the Ctrl-C decision, and token minting for ``--user``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TEST_SECRET, LiveServer
from rich.console import Console

from netra_actors import _cli
from netra_actors._auth import SECRET_FILE, load_secret, verify_token
from netra_actors._chat import Chat, RunView, interrupt_action, resolve_token, run_chat
from netra_actors._config import ENV_PREFIX, Config
from netra_actors._exceptions import NetraError
from netra_actors.testing import check_lifecycle


@pytest.fixture(autouse=True)
def _no_netra_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``NETRA_ACTORS_*`` variables of the outer environment out of these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _args(*argv: str) -> Any:
    return _cli._parser().parse_args(["chat", *argv])


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# --- --once against a real server -------------------------------------------------------------


@pytest.mark.network
async def test_once_json_prints_the_run_as_json_lines(live_server: LiveServer) -> None:
    token = live_server.token("alice")
    out = io.StringIO()
    args = _args("--once", "what is 2+3*4?", "--json", "--url", live_server.url)
    assert await run_chat(args, token, stdout=out) == 0

    frames = _lines(out.getvalue())
    assert frames[0]["type"] == "run_accepted"
    run_id = frames[0]["run_id"]
    events = frames[1:]
    assert {e["run_id"] for e in events} == {run_id}
    assert events[0]["type"] == "agent_started"
    assert events[-1]["type"] == "agent_completed"
    assert "14" in events[-1]["data"]["final_response"]
    report = check_lifecycle(frames)
    assert report.runs[run_id].terminal == "agent_completed"
    streamed = "".join(e["data"]["text"] for e in events if e["type"] == "partial_result")
    assert "14" in streamed
    assert [e["type"] for e in events if e["type"].startswith("tool_")] == [
        "tool_executing",
        "tool_completed",
    ]


@pytest.mark.network
async def test_once_exit_status_follows_how_the_run_ended(live_server: LiveServer) -> None:
    token = live_server.token("bob")
    out = io.StringIO()
    args = _args("--once", "crash", "--json", "--url", live_server.url, "--thread", "t-crash")
    assert await run_chat(args, token, stdout=out) == 1
    frames = _lines(out.getvalue())
    assert frames[-1]["type"] == "agent_error"
    assert {e["thread_id"] for e in frames} == {"t-crash"}
    check_lifecycle(frames)


@pytest.mark.network
async def test_once_rendered_without_json(live_server: LiveServer) -> None:
    token = live_server.token("carol")
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None)
    args = _args("--once", "what is 2+3*4?", "--url", live_server.url)
    assert await run_chat(args, token, stdout=out, console=console) == 0
    text = out.getvalue()
    assert "> what is 2+3*4?" in text
    assert "thinking: " in text
    assert '✓ calculator {"expression":"2+3*4"}  ok in ' in text
    assert "= 14" in text
    assert "✓ completed in " in text


def _command() -> list[str]:
    script = Path(sys.executable).with_name("netra-actors")
    return [str(script)] if script.exists() else [sys.executable, "-m", "netra_actors"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


@pytest.mark.network
async def test_the_entry_point_once_json(live_server: LiveServer) -> None:
    """The console script, as a script would run it (a token given with --token)."""
    argv = [*_command(), "chat", "--once", "what is 2+3*4?", "--json"]
    argv += ["--url", live_server.url, "--token", live_server.token("dave")]
    with trio.fail_after(60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, env=_env())
    assert (done.returncode, done.stderr) == (0, b"")
    frames = _lines(done.stdout.decode())
    check_lifecycle(frames)
    assert frames[-1]["type"] == "agent_completed"
    assert "14" in frames[-1]["data"]["final_response"]


@pytest.mark.network
async def test_the_entry_point_mints_a_token_for_user(live_server: LiveServer) -> None:
    """``--user`` with the server's secret (NETRA_ACTORS_SECRET) and no ``--token``."""
    argv = [*_command(), "chat", "--once", "stream 3", "--json", "--user", "erin"]
    argv += ["--url", live_server.url]
    env = _env() | {ENV_PREFIX + "SECRET": TEST_SECRET}
    with trio.fail_after(60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, env=env)
    assert done.returncode == 0, done.stderr
    frames = _lines(done.stdout.decode())
    assert frames[1]["data"]["user_id"] == "erin"
    assert [f["data"]["text"] for f in frames if f["type"] == "partial_result"] == [
        "t0 ",
        "t1 ",
        "t2 ",
    ]


@pytest.mark.network
async def test_a_refused_token_exits_2(live_server: LiveServer) -> None:
    argv = [*_command(), "chat", "--once", "hi", "--json", "--url", live_server.url]
    argv += ["--token", "not-a-token"]
    with trio.fail_after(60):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, env=_env(), check=False
        )
    assert done.returncode == 2
    assert done.stdout == b""
    assert b"refused the token" in done.stderr


def test_json_needs_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["chat", "--json", "--token", "t"]) == 2
    assert "--json needs --once" in capsys.readouterr().err


# --- drawing recorded events --------------------------------------------------------------------


def _event(seq: int, kind: str, ts: float = 100.0, **data: Any) -> dict[str, Any]:
    return {"type": kind, "seq": seq, "run_id": "r1", "thread_id": "main", "ts": ts, "data": data}


CALC_RUN = [
    {"type": "run_accepted", "run_id": "r1", "thread_id": "main", "client_msg_id": "m1"},
    _event(1, "agent_started", agent_name="demo", user_id="u", text="what is 2+3*4?"),
    _event(2, "agent_thinking", reasoning="Multiplication binds tighter, ", step=0),
    _event(3, "agent_thinking", reasoning="I will use the calculator.", step=0),
    _event(
        4,
        "tool_executing",
        call_id="c1",
        tool_name="calculator",
        parameters={"expression": "2+3*4"},
    ),
]
CALC_END = [
    _event(
        5,
        "tool_completed",
        call_id="c1",
        tool_name="calculator",
        status="ok",
        results=14,
        duration_ms=2.7,
    ),
    _event(6, "agent_thinking", reasoning="The calculator returned 14.", step=1),
    _event(7, "partial_result", text="2+3*4 "),
    _event(8, "partial_result", text="is 14."),
    _event(9, "agent_completed", ts=100.75, status="ok", final_response="2+3*4 is 14."),
]


def _draw(view: RunView, *, spinner: bool = True) -> str:
    console = Console(record=True, width=100, color_system=None)
    console.print(view.render(spinner=spinner))
    return console.export_text()


def _view(frames: list[dict[str, Any]], text: str | None = None) -> RunView:
    view = RunView(text, show_text=text is not None)
    for frame in frames:
        view.apply(frame)
    return view


def test_a_run_in_progress_shows_the_tool_running_and_a_spinner() -> None:
    view = _view(CALC_RUN)
    assert view.run_id == "r1"
    assert not view.done
    lines = _draw(view).splitlines()
    assert lines[:2] == [
        "thinking: Multiplication binds tighter, I will use the calculator.",
        '  ⚙ calculator {"expression":"2+3*4"}  running',
    ]
    # The spinner's glyph depends on the clock; its status text does not.
    assert len(lines) == 3
    assert lines[2].endswith(" running calculator...")


def test_a_completed_run() -> None:
    view = _view(CALC_RUN + CALC_END, text="what is 2+3*4?")
    assert view.done
    assert (view.outcome, view.exit_code, view.answer) == ("completed", 0, "2+3*4 is 14.")
    assert _draw(view).splitlines() == [
        "> what is 2+3*4?",
        "thinking: Multiplication binds tighter, I will use the calculator.",
        '  ✓ calculator {"expression":"2+3*4"}  ok in 2.7 ms',
        "thinking: The calculator returned 14.",
        "2+3*4 is 14.",
        "✓ completed in 0.75 s",
    ]


def test_the_status_line_follows_the_run() -> None:
    view = _view(CALC_RUN[:2])
    assert "thinking..." in _draw(view)
    view.apply(CALC_RUN[4])
    assert "running calculator..." in _draw(view)
    for frame in CALC_END[:3]:
        view.apply(frame)
    assert "answering..." in _draw(view)
    view.cancel_requested = True
    assert "cancelling..." in _draw(view)
    view.reconnecting = True
    assert "reconnecting..." in _draw(view)
    assert "..." not in _draw(view, spinner=False)


def test_a_failed_tool_and_an_agent_error() -> None:
    view = _view(
        [
            _event(1, "agent_started", agent_name="demo", user_id="u", text="fail"),
            _event(
                2, "tool_executing", call_id="c1", tool_name="fail", parameters={"message": "no"}
            ),
            _event(
                3,
                "tool_completed",
                call_id="c1",
                tool_name="fail",
                status="error",
                error={"type": "tool_error", "message": "failure on request"},
                duration_ms=1500.0,
            ),
            _event(4, "agent_error", error={"type": "llm_error", "message": "the model failed"}),
        ]
    )
    assert (view.outcome, view.exit_code) == ("error", 1)
    assert _draw(view).splitlines() == [
        '  ✗ fail {"message":"no"}  error in 1.50 s: tool_error: failure on request',
        "✗ error: llm_error: the model failed",
    ]


def test_a_cancelled_run() -> None:
    view = _view(
        [
            _event(1, "agent_started", agent_name="demo", user_id="u", text="sleep 30"),
            _event(2, "agent_thinking", reasoning="I will sleep for 30 seconds.", step=0),
            _event(
                3, "tool_executing", call_id="c1", tool_name="sleep", parameters={"seconds": 30}
            ),
            _event(
                4,
                "tool_completed",
                call_id="c1",
                tool_name="sleep",
                status="cancelled",
                error={"type": "cancelled", "message": "the run was cancelled"},
                duration_ms=812.5,
            ),
            _event(5, "agent_cancelled", reason="client"),
        ]
    )
    assert (view.outcome, view.exit_code) == ("cancelled", 1)
    assert _draw(view).splitlines() == [
        "thinking: I will sleep for 30 seconds.",
        '  ✗ sleep {"seconds":30}  cancelled in 812.5 ms: cancelled: the run was cancelled',
        "⊘ cancelled (client)",
    ]


def test_a_refused_message_and_notes() -> None:
    view = RunView("hi")
    view.note("reconnected; resuming after seq 4")
    view.apply({"type": "resume_gap", "session_id": "s", "oldest_seq": 9, "last_seq": 12})
    view.apply(
        {"type": "error", "code": "busy", "message": "thread main is busy", "client_msg_id": "m"}
    )
    assert (view.outcome, view.exit_code) == ("refused", 1)
    assert _draw(view).splitlines() == [
        "reconnected; resuming after seq 4",
        "some events were lost while disconnected (resume_gap)",
        "✗ refused: busy: thread main is busy",
    ]


def test_a_completed_run_without_streamed_text_shows_the_final_response() -> None:
    view = _view(
        [
            _event(1, "agent_started", agent_name="demo", user_id="u", text="hi"),
            _event(2, "agent_completed", ts=100.5, status="ok", final_response="Hello."),
        ]
    )
    assert _draw(view).splitlines() == ["Hello.", "✓ completed in 0.50 s"]


# --- routing frames -----------------------------------------------------------------------------


class _FakeConn:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def cancel(self, run_id: str) -> None:
        self.cancelled.append(run_id)


def test_events_before_run_accepted_are_kept_and_other_runs_ignored() -> None:
    out = io.StringIO()
    chat = Chat(_FakeConn(), json_out=out)  # type: ignore[arg-type]
    chat.view = view = RunView("what is 2+3*4?")
    chat.pending = "m1"
    chat.route({"type": "session_ready", "session_id": "s", "user_id": "u", "last_seq": 0})
    other = {**_event(1, "agent_started", agent_name="demo", user_id="u", text="x"), "run_id": "r0"}
    chat.route(other)
    chat.route(CALC_RUN[1])  # r1's first event, before its run_accepted
    chat.route(CALC_RUN[0])
    for frame in CALC_RUN[2:] + CALC_END:
        chat.route(frame)
    chat.route({**CALC_END[0], "seq": 10, "run_id": "r0"})
    assert view.done
    assert view.answer == "2+3*4 is 14."
    printed = _lines(out.getvalue())
    assert printed == CALC_RUN + CALC_END
    assert chat.ready.is_set()


async def test_ctrl_c_before_run_accepted_cancels_once_it_is_known() -> None:
    conn = _FakeConn()
    async with trio.open_nursery() as nursery:
        chat = Chat(conn)  # type: ignore[arg-type]
        chat._nursery = nursery
        chat.view = view = RunView("sleep 30")
        chat.pending = "m1"
        assert chat.interrupt(10.0) == "cancel"
        assert view.cancel_requested
        chat.route(CALC_RUN[0])
    assert conn.cancelled == ["r1"]
    async with trio.open_nursery() as nursery:
        chat._nursery = nursery
        assert chat.interrupt(10.5) == "quit"  # the second press within the window


def test_a_reconnection_mid_run_is_noted() -> None:
    chat = Chat(_FakeConn())  # type: ignore[arg-type]
    chat.route({"type": "session_ready", "session_id": "s", "user_id": "u", "last_seq": 0})
    chat.view = view = RunView("x")
    chat.pending = "m1"
    for frame in CALC_RUN:
        chat.route(frame)
    chat.route(
        {"type": "session_ready", "session_id": "s", "user_id": "u", "last_seq": 4, "after_seq": 4}
    )
    assert "reconnected; resuming after seq 4" in _draw(view)


# --- Ctrl-C --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "last", "active", "expected"),
    [
        (10.0, None, True, "cancel"),  # first press during a run
        (11.0, 10.0, True, "quit"),  # second press within the window
        (12.0, 10.0, True, "quit"),  # ... at its edge
        (12.5, 10.0, True, "cancel"),  # later: another cancel
        (10.0, None, False, "quit"),  # at the prompt
        (10.0, 9.9, False, "quit"),
    ],
)
def test_interrupt_action(now: float, last: float | None, active: bool, expected: str) -> None:
    assert interrupt_action(now, last, active) == expected


def test_interrupt_without_an_active_run_quits() -> None:
    chat = Chat(_FakeConn())  # type: ignore[arg-type]
    assert chat.interrupt(1.0) == "quit"
    chat.view = _view(CALC_RUN + CALC_END)
    assert chat.interrupt(100.0) == "quit"  # its run has ended


# --- tokens --------------------------------------------------------------------------------------


def test_user_mints_a_token_from_the_data_dir_secret(tmp_path: Path) -> None:
    secret = load_secret(Config(data_dir=tmp_path))  # as the server creates it
    args = _args("--user", "frank", "--data-dir", str(tmp_path), "--token-ttl", "60")
    token = resolve_token(args, environ={})
    assert verify_token(token, secret) == "frank"


def test_the_secret_from_the_environment(tmp_path: Path) -> None:
    args = _args("--data-dir", str(tmp_path))
    token = resolve_token(args, environ={ENV_PREFIX + "SECRET": TEST_SECRET})
    assert verify_token(token, TEST_SECRET.encode()) == "demo"  # the default user
    assert not (tmp_path / SECRET_FILE).exists()


def test_a_given_token_wins(tmp_path: Path) -> None:
    assert resolve_token(_args("--token", "abc", "--data-dir", str(tmp_path)), environ={}) == "abc"


def test_no_secret_is_created_for_a_client(tmp_path: Path) -> None:
    with pytest.raises(NetraError, match="no secret at"):
        resolve_token(_args("--data-dir", str(tmp_path / "none")), environ={})
    assert not (tmp_path / "none").exists()


# --- interactive, under tmux ---------------------------------------------------------------------


@pytest.mark.network
async def test_interactive_session_under_tmux(live_server: LiveServer, tmp_path: Path) -> None:
    """Ask, then cancel a run with Ctrl-C, then quit with Ctrl-C at the prompt."""
    assert shutil.which("tmux"), (
        "tmux is missing: `make test` installs it (scripts/ensure-test-tools)"
    )
    session = f"netra-chat-{os.getpid()}"
    status = tmp_path / "status"
    command = " ".join(
        [*_command(), "chat", "--url", live_server.url, "--token", live_server.token("grace")]
    )
    socket = ["-S", str(tmp_path / "tmux.sock")]
    await trio.run_process(
        ["tmux", *socket, "new-session", "-d", "-s", session, "-x", "100", "-y", "40",
         f"{command}; echo $? > {status}; echo EXITED; sleep 60"],
        env=_env() | {"TERM": "xterm-256color"},
    )  # fmt: skip
    try:

        async def keys(*keys: str) -> None:
            await trio.run_process(["tmux", *socket, "send-keys", "-t", session, *keys])

        async def wait_for(needle: str) -> str:
            with trio.move_on_after(30):
                while True:
                    done = await trio.run_process(
                        ["tmux", *socket, "capture-pane", "-p", "-t", session],
                        capture_stdout=True,
                    )
                    screen = done.stdout.decode()
                    if needle in screen:
                        return screen
                    await trio.sleep(0.1)
            raise AssertionError(f"{needle!r} not on the screen:\n{screen}")

        await wait_for("you>")
        await keys("what is 2+3*4?", "Enter")
        screen = await wait_for("✓ completed in")
        assert '✓ calculator {"expression":"2+3*4"}  ok in ' in screen
        assert "= 14" in screen
        await keys("sleep 30", "Enter")
        await wait_for("running sleep...")
        await keys("C-c")
        screen = await wait_for("⊘ cancelled (client)")
        assert "✗ sleep" in screen
        await wait_for("⊘ cancelled (client)\nyou>")
        await keys("C-c")
        await wait_for("EXITED")
        assert status.read_text().strip() == "0"
    finally:
        await trio.run_process(["tmux", *socket, "kill-server"], check=False)
