"""``netra-actors chat``: a terminal client that renders runs live.

Built on the public client library (:mod:`netra_actors.client`), which keeps the
connection up and resumes the stream by ``seq`` after a drop; this module only
routes frames to the run being shown and draws it.

- Interactive (default): a prompt; each line is sent as a ``user_message`` and its
  run is drawn live with rich (spinner, reasoning, tool calls with durations,
  the streamed answer, how it ended). Ctrl-C during a run cancels it; a second
  Ctrl-C within :data:`QUIT_WINDOW` seconds, Ctrl-C at the prompt, Ctrl-D or
  ``/quit`` quits.
- ``--once TEXT``: one message, then exit. With ``--json`` every frame of that run
  (``run_accepted``, its events, an ``error`` refusing it, ``resume_gap``) is
  printed as one JSON object per line, for scripts and tests.

Exit status of ``--once``: 0 when the run ended ``agent_completed``; 1 when it
ended ``agent_error`` or ``agent_cancelled``, or the server refused the message
(``error`` frame); 2 when no connection could be made (refused token,
unreachable server), like every other ``netra-actors`` failure; 130 when the
user quit (a second Ctrl-C) before the run ended.

The drawing is a pure function of the events (:class:`RunView`), so it is
tested without a terminal.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal, TextIO

import attrs
import orjson
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from . import client
from ._auth import SECRET_FILE, issue_token, load_secret
from ._config import Config
from ._exceptions import NetraError
from ._messages import TERMINAL_EVENTS

Frame = dict[str, Any]

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
#: A second Ctrl-C within this many seconds of the first quits instead of cancelling.
QUIT_WINDOW = 2.0
#: Redraws per second of the live view (the spinner, and the text streamed meanwhile).
REFRESH_PER_SECOND = 12

Action = Literal["cancel", "quit"]


def interrupt_action(
    now: float, last_interrupt: float | None, run_active: bool, window: float = QUIT_WINDOW
) -> Action:
    """What a Ctrl-C at ``now`` does: ``cancel`` the active run, or ``quit``.

    Quit when no run is active (at the prompt, or its run already ended) or when
    the previous Ctrl-C was at most ``window`` seconds ago; cancel otherwise.
    """
    if not run_active:
        return "quit"
    if last_interrupt is not None and now - last_interrupt <= window:
        return "quit"
    return "cancel"


# -- the view of one run ----------------------------------------------------------------------


@attrs.define
class _Thinking:
    step: object
    text: str


@attrs.define
class _Answer:
    text: str


@attrs.define
class _Note:
    text: str
    style: str


@attrs.define
class ToolCall:
    """One tool call: announced by ``tool_executing``, closed by ``tool_completed``."""

    call_id: str
    name: str
    parameters: object
    status: str | None = None
    duration_ms: float | None = None
    error: object = None


_Block = _Thinking | _Answer | _Note | ToolCall


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _compact(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


def _error_text(error: object) -> str:
    if isinstance(error, Mapping):
        return f"{error.get('type', '?')}: {error.get('message', '')}"
    return "" if error is None else str(error)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


class RunView:
    """The state of one run, built from its frames in order; a rich renderable.

    ``apply`` takes the run's frames (``run_accepted``, its events, an ``error``
    refusing the message, ``resume_gap``); ``render`` draws it. Nothing here does
    I/O or reads a clock, so the same events always draw the same text (except
    the spinner's animation frame).
    """

    def __init__(self, text: str | None = None, *, show_text: bool = False) -> None:
        self.text = text
        self.show_text = show_text
        self.run_id: str | None = None
        self.blocks: list[_Block] = []
        self.tools: dict[str, ToolCall] = {}
        self.terminal: Frame | None = None
        #: ``(code, message)`` of an ``error`` frame that refused the message.
        self.refused: tuple[str, str] | None = None
        self.started_ts: float | None = None
        self.cancel_requested = False
        self.reconnecting = False
        self.done_event = trio.Event()

    # -- state ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.terminal is not None or self.refused is not None

    @property
    def outcome(self) -> str:
        """``running``, ``completed``, ``error``, ``cancelled`` or ``refused``."""
        if self.refused is not None:
            return "refused"
        if self.terminal is None:
            return "running"
        return {"agent_completed": "completed", "agent_error": "error"}.get(
            self.terminal["type"], "cancelled"
        )

    @property
    def exit_code(self) -> int:
        """0 for a completed run, 1 for any other end (see the module doc)."""
        return 0 if self.outcome == "completed" else 1

    @property
    def answer(self) -> str:
        """The streamed answer so far (the final response if nothing was streamed)."""
        streamed = "".join(b.text for b in self.blocks if isinstance(b, _Answer))
        if not streamed and self.terminal is not None:
            return str(self.terminal.get("data", {}).get("final_response", ""))
        return streamed

    def note(self, text: str, style: str = "yellow") -> None:
        """Add a line that is not an event (reconnected, resume gap...)."""
        self.blocks.append(_Note(text, style))

    def apply(self, frame: Mapping[str, Any]) -> None:
        """Take one frame of this run, in order."""
        kind = frame.get("type")
        if kind == "run_accepted":
            self.run_id = frame.get("run_id")
            return
        if kind == "error":
            self.refused = (str(frame.get("code", "?")), str(frame.get("message", "")))
            self.done_event.set()
            return
        if kind == "resume_gap":
            self.note("some events were lost while disconnected (resume_gap)")
            return
        if self.done:
            return
        data = frame.get("data")
        data = data if isinstance(data, Mapping) else {}
        if self.started_ts is None and isinstance(frame.get("ts"), int | float):
            self.started_ts = float(frame["ts"])
        match kind:
            case "agent_thinking":
                step, reasoning = data.get("step"), str(data.get("reasoning", ""))
                last = self.blocks[-1] if self.blocks else None
                if isinstance(last, _Thinking) and last.step == step:
                    last.text += reasoning
                else:
                    self.blocks.append(_Thinking(step, reasoning))
            case "tool_executing":
                call = ToolCall(
                    str(data.get("call_id")), str(data.get("tool_name")), data.get("parameters")
                )
                self.tools[call.call_id] = call
                self.blocks.append(call)
            case "tool_completed":
                call_id = str(data.get("call_id"))
                found = self.tools.get(call_id)
                if found is None:  # its tool_executing was lost (resume_gap)
                    found = ToolCall(call_id, str(data.get("tool_name")), None)
                    self.tools[call_id] = found
                    self.blocks.append(found)
                found.status = str(data.get("status"))
                duration = data.get("duration_ms")
                found.duration_ms = float(duration) if isinstance(duration, int | float) else None
                found.error = data.get("error")
            case "partial_result":
                piece = str(data.get("text", ""))
                last = self.blocks[-1] if self.blocks else None
                if isinstance(last, _Answer):
                    last.text += piece
                else:
                    self.blocks.append(_Answer(piece))
            case _ if kind in TERMINAL_EVENTS:
                self.terminal = dict(frame)
                self.done_event.set()

    # -- drawing ----------------------------------------------------------------------------

    def _status(self) -> str:
        if self.reconnecting:
            return "reconnecting..."
        if self.cancel_requested:
            return "cancelling..."
        running = [call.name for call in self.tools.values() if call.status is None]
        if running:
            return f"running {', '.join(running)}..."
        if self.blocks and isinstance(self.blocks[-1], _Answer):
            return "answering..."
        return "thinking..."

    def _tool_line(self, call: ToolCall) -> Text:
        params = "" if call.parameters is None else _clip(_compact(call.parameters), 70)
        line = Text()
        if call.status is None:
            line.append("  ⚙ ", style="cyan")
            line.append(call.name, style="bold cyan")
            line.append(f" {params}", style="cyan")
            line.append("  running", style="dim")
            return line
        ok = call.status == "ok"
        style = "green" if ok else "red"
        line.append("  ✓ " if ok else "  ✗ ", style=style)
        line.append(call.name, style=f"bold {style}")
        if params:
            line.append(f" {params}", style="dim")
        line.append(f"  {call.status} in {_ms(call.duration_ms)}", style=style)
        if call.error is not None:
            line.append(f": {_clip(_error_text(call.error), 100)}", style=style)
        return line

    def _end_line(self) -> Text:
        if self.refused is not None:
            code, message = self.refused
            return Text(f"✗ refused: {code}: {message}", style="bold red")
        assert self.terminal is not None
        data = self.terminal.get("data") or {}
        kind = self.terminal["type"]
        if kind == "agent_completed":
            ts = self.terminal.get("ts")
            took = (
                f" in {float(ts) - self.started_ts:.2f} s"
                if isinstance(ts, int | float) and self.started_ts is not None
                else ""
            )
            return Text(f"✓ completed{took}", style="bold green")
        if kind == "agent_error":
            return Text(f"✗ error: {_error_text(data.get('error'))}", style="bold red")
        return Text(f"⊘ cancelled ({data.get('reason', '?')})", style="bold yellow")

    def render(self, *, spinner: bool = True) -> RenderableType:
        """The run as drawn so far: one line or paragraph per block, then the status."""
        parts: list[RenderableType] = []
        if self.show_text and self.text is not None:
            parts.append(Text(f"> {self.text}", style="bold"))
        for block in self.blocks:
            if isinstance(block, _Thinking):
                parts.append(Text(f"thinking: {block.text.strip()}", style="dim italic"))
            elif isinstance(block, ToolCall):
                parts.append(self._tool_line(block))
            elif isinstance(block, _Answer):
                parts.append(Text(block.text))
            else:
                parts.append(Text(block.text, style=block.style))
        if self.done:
            if (
                self.terminal is not None
                and self.terminal["type"] == "agent_completed"
                and not any(isinstance(b, _Answer) for b in self.blocks)
            ):
                parts.append(Text(self.answer))
            parts.append(self._end_line())
        elif spinner:
            parts.append(Spinner("dots", text=Text(self._status(), style="cyan")))
        return Group(*parts)

    def __rich__(self) -> RenderableType:
        return self.render()


# -- routing frames to the run shown ----------------------------------------------------------


class Chat:
    """One connection's frames, routed to the run being shown (one at a time).

    ``run_accepted`` may come after the run's first events (docs/protocol.md), so
    events of runs not yet known are kept until the ``run_accepted`` of the
    message sent arrives. Events of other runs (another tab of the same user)
    are not shown.
    """

    def __init__(
        self,
        conn: client.NetraClient,
        *,
        thread_id: str | None = None,
        json_out: TextIO | None = None,
    ) -> None:
        self.conn = conn
        self.thread_id = thread_id
        self.json_out = json_out
        self.view: RunView | None = None
        self.pending: str | None = None  # client_msg_id sent, run_accepted not yet seen
        self.early: list[Frame] = []
        self.connections = 0
        self.last_interrupt: float | None = None
        #: Set by the first ``session_ready``.
        self.ready = trio.Event()
        self._nursery: trio.Nursery | None = None

    def _emit(self, frame: Mapping[str, Any]) -> None:
        if self.json_out is not None:
            self.json_out.write(orjson.dumps(frame).decode() + "\n")
            self.json_out.flush()

    def route(self, frame: Frame) -> None:
        """Pass one frame from the connection to the view it belongs to."""
        kind = frame.get("type")
        view = self.view
        if kind == "session_ready":
            self.connections += 1
            self.ready.set()
            if self.connections > 1 and view is not None and not view.done:
                view.note(f"reconnected; resuming after seq {frame.get('after_seq', '-')}")
            return
        if view is None or view.done:
            return
        if kind == "resume_gap":
            self._emit(frame)
            view.apply(frame)
            return
        if self.pending is not None:
            if kind == "run_accepted" and frame.get("client_msg_id") == self.pending:
                self.pending = None
                self._emit(frame)
                view.apply(frame)
                for event in self.early:
                    if event.get("run_id") == view.run_id:
                        self._emit(event)
                        view.apply(event)
                self.early.clear()
                if view.cancel_requested and view.run_id is not None and not view.done:
                    self._start_cancel(view.run_id)
            elif kind == "error" and frame.get("client_msg_id") == self.pending:
                self.pending = None
                self._emit(frame)
                view.apply(frame)
            elif "seq" in frame:
                self.early.append(frame)
            return
        if "seq" in frame and frame.get("run_id") == view.run_id:
            self._emit(frame)
            view.apply(frame)

    async def pump(self) -> None:
        """Route every frame until the connection closes."""
        async with aclosing(self.conn.frames()) as frames:
            async for frame in frames:
                self.route(frame)

    def _start_cancel(self, run_id: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._cancel, run_id)

    async def _cancel(self, run_id: str) -> None:
        try:
            await self.conn.cancel(run_id)
        except client.ConnectionLost:
            if self.view is not None:
                self.view.note("could not send the cancel: not connected", "red")

    def interrupt(self, now: float) -> Action:
        """A Ctrl-C at ``now``: cancel the active run or tell the caller to quit."""
        view = self.view
        action = interrupt_action(now, self.last_interrupt, view is not None and not view.done)
        self.last_interrupt = now
        if action == "cancel" and view is not None:
            view.cancel_requested = True
            if view.run_id is not None:
                self._start_cancel(view.run_id)
        return action

    async def ask(self, text: str, console: Console | None, *, show_text: bool = False) -> RunView:
        """Send ``text`` and follow its run to the end; drawn live on ``console`` if given."""
        view = RunView(text, show_text=show_text)
        self.view = view
        self.early.clear()
        self.pending = None
        # Set before sending: the reply may be routed before send_message returns.
        msg_id = f"chat-{secrets.token_hex(8)}"
        self.pending = msg_id
        try:
            await self.conn.send_message(text, thread_id=self.thread_id, client_msg_id=msg_id)
        except client.ConnectionLost as exc:
            self.pending = None
            view.apply({"type": "error", "code": "not_sent", "message": str(exc)})
            if console is not None:
                console.print(view.render(spinner=False))
            return view
        if console is None:
            await view.done_event.wait()
            return view
        # Transient: the live area (cropped to the screen) is replaced by the whole run
        # when it ends, or when the user quits meanwhile.
        try:
            with Live(
                view, console=console, auto_refresh=False, redirect_stdout=False, transient=True
            ) as live:
                while not view.done:
                    view.reconnecting = not _connected(self.conn)
                    live.refresh()
                    with trio.move_on_after(1 / REFRESH_PER_SECOND):
                        await view.done_event.wait()
        finally:
            view.reconnecting = False
            console.print(view.render(spinner=False))
        return view


def _connected(conn: client.NetraClient) -> bool:
    # The client library has no public "connected" flag; its open WebSocket is it.
    return getattr(conn, "_ws", None) is not None


# -- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``chat`` subcommand's options."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    parser.add_argument(
        "--user",
        default="demo",
        help="mint a token for this user from the local secret (default demo)",
    )
    parser.add_argument("--token", default=None, help="use this token instead of --user")
    parser.add_argument("--thread", default=None, help="thread id of the messages (default main)")
    parser.add_argument(
        "--once",
        metavar="TEXT",
        default=None,
        help="send TEXT, show its run, exit: 0 completed, 1 error/cancelled/refused",
    )
    parser.add_argument(
        "--json", action="store_true", help="with --once: print the run's frames as JSON lines"
    )
    Config.add_arguments(parser, ("data_dir", "token_ttl"))


def resolve_token(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """``--token``, else a token for ``--user`` signed with the local secret.

    The secret is ``NETRA_ACTORS_SECRET`` or the file ``secret`` in ``--data-dir``
    (the server's); unlike ``serve`` and ``token`` this never creates that file,
    since a new secret would sign tokens no server accepts.
    """
    if args.token:
        return str(args.token)
    config = Config.from_args(args, environ)
    path = Path(config.data_dir) / SECRET_FILE
    if not config.secret and not path.is_file():
        raise NetraError(
            f"no secret at {path} to sign a token for {args.user!r}: pass --token, "
            "--data-dir of the server, or set NETRA_ACTORS_SECRET"
        )
    return issue_token(args.user, load_secret(config), ttl=config.token_ttl)


async def run_chat(
    args: argparse.Namespace,
    token: str,
    *,
    stdout: TextIO | None = None,
    console: Console | None = None,
) -> int:
    """The ``chat`` command in the current trio run; returns the exit status."""
    out = stdout if stdout is not None else sys.stdout
    json_out = out if args.once is not None and args.json else None
    if console is None:
        console = Console(file=out) if json_out is None else Console(stderr=True)
    async with client.connect(args.url, token) as conn, trio.open_nursery() as nursery:
        chat = Chat(conn, thread_id=args.thread, json_out=json_out)
        chat._nursery = nursery
        nursery.start_soon(chat.pump)
        with trio.CancelScope() as quit_scope:
            nursery.start_soon(_watch_interrupts, chat, quit_scope)
            if args.once is not None:
                view = await chat.ask(
                    args.once, None if json_out is not None else console, show_text=True
                )
                nursery.cancel_scope.cancel()
                return view.exit_code
            await _interactive(chat, console)
        nursery.cancel_scope.cancel()
        if quit_scope.cancelled_caught:
            console.print()
        return 130 if args.once is not None else 0
    raise AssertionError("unreachable")  # pragma: no cover


async def _watch_interrupts(chat: Chat, quit_scope: trio.CancelScope) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # embedded in another thread: Ctrl-C keeps its default
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            if chat.interrupt(time.monotonic()) == "quit":
                quit_scope.cancel()
                return


async def _interactive(chat: Chat, console: Console) -> None:
    with trio.move_on_after(2):
        await chat.ready.wait()
    target = chat.conn.url + (f" (thread {chat.thread_id})" if chat.thread_id else "")
    console.print(
        f"[bold]netra-actors chat[/bold] as {chat.conn.user_id or '?'} at {target}\n"
        "[dim]Ctrl-C cancels a run (twice quits); Ctrl-C at the prompt, Ctrl-D or /quit "
        "quits.[/dim]"
    )
    while True:
        chat.view = None
        try:
            line = await trio.to_thread.run_sync(
                console.input, "[bold blue]you>[/bold blue] ", abandon_on_cancel=True
            )
        except EOFError:
            console.print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        await chat.ask(text, console)


def main(args: argparse.Namespace) -> int:
    """``netra-actors chat``: the exit status (see the module doc)."""
    if args.json and args.once is None:
        print("netra-actors: --json needs --once", file=sys.stderr)
        return 2
    token = resolve_token(args)
    try:
        return trio.run(run_chat, args, token)
    except (NetraError, OSError) as exc:
        print(f"netra-actors: {exc}", file=sys.stderr)
        return 2


__all__: Sequence[str] = (
    "DEFAULT_URL",
    "QUIT_WINDOW",
    "Chat",
    "RunView",
    "ToolCall",
    "add_arguments",
    "interrupt_action",
    "main",
    "resolve_token",
    "run_chat",
)
