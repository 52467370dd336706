"""The ``netra-actors`` command: ``serve`` the demo (or another agent), print a ``token``,
inspect stored ``runs`` (``runs list``, ``runs show RUN_ID``), ``chat`` with a server."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson
import trio

from ._auth import issue_token, load_secret
from ._chat import add_arguments as add_chat_arguments
from ._chat import main as chat_main
from ._config import Config, parse_gc_thresholds
from ._exceptions import NetraError
from ._messages import Event
from ._store import DB_FILENAME, SqliteStore, StoredRun, StoreError, open_store
from ._telemetry import JsonLogFormatter, Telemetry, install_otel_from_env
from ._tracker import RUN_STATES

T = TypeVar("T")

SERVE_FLAGS = (
    "host",
    "port",
    "data_dir",
    "agent",
    "max_steps",
    "tool_timeout",
    "window_events",
    "max_frame_bytes",
    "shutdown_grace",
    "token_ttl",
    "log_level",
    "tls_cert",
    "tls_key",
    "allowed_origins",
    "max_connections",
    "max_connections_per_user",
    "handshake_timeout",
    "receive_queue",
    "send_timeout",
    "heartbeat_interval",
    "heartbeat_timeout",
    "rate_limit",
    "rate_burst",
    "window_max_age",
    "idle_session_grace",
    "thread_policy",
    "max_queued_per_thread",
    "max_active_runs_per_user",
    "max_concurrent_tools",
    "max_session_tools",
    "tool_cancel_grace",
    "llm",
    "base_url",
    "model",
    "llm_timeout",
    "llm_connect_timeout",
    "llm_max_retries",
    "write_linger",
    "run_timeout",
    "stall_timeout",
    "store",
    "sqlite_synchronous",
    "retention_max_age",
    "retention_max_events",
    "retention_interval",
    "metrics_token",
    "otel",
    "log_format",
    "gc_thresholds",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netra-actors",
        description="Ordered, cancellable, real-time event streams for AI-agent runs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebSocket server (demo agent by default)")
    Config.add_arguments(serve, SERVE_FLAGS)
    token = commands.add_parser("token", help="print a token the server accepts for USER")
    token.add_argument("user", metavar="USER")
    token.add_argument("--ttl", type=float, default=None, help="lifetime in seconds")
    Config.add_arguments(token, ("data_dir",))
    runs = commands.add_parser("runs", help="inspect the runs kept in data-dir/netra.sqlite3")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True)
    listing = runs_commands.add_parser("list", help="the newest runs first, as a table")
    listing.add_argument("--user", default=None, help="only the runs of this user")
    listing.add_argument(
        "--state", default=None, choices=RUN_STATES, help="only runs in this state"
    )
    listing.add_argument(
        "--limit", type=_positive_int, default=50, help="at most this many runs (default 50)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array of runs")
    Config.add_arguments(listing, ("data_dir",))
    show = runs_commands.add_parser("show", help="one run: its header and event timeline")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument(
        "--json", action="store_true", help='print {"run": {...}, "events": [frames]}'
    )
    Config.add_arguments(show, ("data_dir",))
    chat = commands.add_parser("chat", help="interactive terminal client (or --once TEXT)")
    add_chat_arguments(chat)
    return parser


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _banner(config: Config, url: str, token: str) -> str:
    return "\n".join(
        [
            f"netra-actors: serving protocol v1 at {url} (agent {config.agent!r}, "
            + (
                "scripted offline LLM)"
                if config.llm == "scripted"
                else f"LLM {config.model!r} at {config.base_url})"
            ),
            f"  a token for user 'demo' (valid {config.token_ttl:g} s):",
            f"    {token}",
            "  connect, for example:",
            f"    {url}?token={token}",
            "  then send:",
            '    {"type":"user_message","text":"what is 2+3*4?"}',
            "  other users: netra-actors token USER",
            (
                f"  runs and events are stored in {config.data_dir / 'netra.sqlite3'} "
                "(netra-actors runs list)"
                if config.store == "sqlite"
                else "  nothing is stored (--store memory)"
            ),
            "  stop with Ctrl-C",
        ]
    )


async def _serve(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully.

    On a signal: stop accepting connections, cancel active runs (reason
    ``shutdown``, each ending with its terminal event within
    ``shutdown_grace``), send connections every event, close them with 1001.
    """
    from ._gateway import Gateway, serve
    from ._runtime import Runtime

    telemetry = Telemetry.from_config(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Runtime(config, telemetry=telemetry) as runtime:
            gateway = Gateway(runtime, config)
            async with trio.open_nursery() as nursery:
                info = await nursery.start(partial(serve, runtime, config, gateway=gateway))
                token = issue_token("demo", load_secret(config), ttl=config.token_ttl)
                print(_banner(config, info.url, token), flush=True)
                async for signum in signals:
                    print(f"netra-actors: {signal.Signals(signum).name}, shutting down", flush=True)
                    break
                # New handshakes get 503 from here on; the listener keeps running so
                # that open connections receive their runs' last events and a 1001.
                gateway.accepting = False
                await runtime.aclose()
                nursery.cancel_scope.cancel()
    print("netra-actors: stopped", flush=True)


# -- runs list / runs show ----------------------------------------------------------------------


def _runs(args: argparse.Namespace) -> int:
    """``runs list`` and ``runs show``: read the store of ``--data-dir``, never create one."""
    config = Config.from_args(args)
    path = Path(config.data_dir) / DB_FILENAME
    if not path.is_file():
        print(
            f"netra-actors: no run store at {path} (runs are kept there by a server or "
            "runtime with --store sqlite and this --data-dir)",
            file=sys.stderr,
        )
        return 1
    if args.runs_command == "list":
        try:
            runs = trio.run(
                _read_store,
                config.data_dir,
                partial(_list_runs, user_id=args.user, state=args.state, limit=args.limit),
            )
        except (sqlite3.Error, StoreError, OSError) as exc:
            return _unreadable(path, exc)
        if args.json:
            print(_json([run.to_dict() for run in runs]))
        else:
            print(format_runs_table(runs))
        return 0
    try:
        found = trio.run(_read_store, config.data_dir, partial(_show_run, run_id=args.run_id))
    except (sqlite3.Error, StoreError, OSError) as exc:
        return _unreadable(path, exc)
    if found is None:
        print(f"netra-actors: no run {args.run_id!r} in {path}", file=sys.stderr)
        return 1
    run, events = found
    if args.json:
        frames = [orjson.loads(event.frame) for event in events]
        print(_json({"run": run.to_dict(), "events": frames}))
    else:
        print(format_run_timeline(run, events))
    return 0


def _unreadable(path: Path, exc: Exception) -> int:
    print(f"netra-actors: cannot read {path}: {exc}", file=sys.stderr)
    return 1


async def _list_runs(
    store: SqliteStore, *, user_id: str | None, state: str | None, limit: int
) -> list[StoredRun]:
    return await store.list_runs(user_id=user_id, state=state, limit=limit)


async def _read_store(data_dir: Path, read: Callable[[SqliteStore], Awaitable[T]]) -> T:
    """``read(store)`` on the data folder's store, opened for the call only.

    A failure (a file that is not a database, a newer schema) is raised as itself,
    not inside the nursery's exception group.
    """
    store = open_store(data_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            try:
                return await read(store)
            finally:
                await store.aclose()
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def _show_run(store: SqliteStore, run_id: str) -> tuple[StoredRun, list[Event]] | None:
    run = await store.get_run(run_id)
    if run is None:
        return None
    return run, await store.run_events(run_id)


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _utc(ts: float | None, *, ms: bool = False) -> str:
    """``ts`` (unix seconds) as ISO 8601 UTC with a ``Z``; ``-`` for none."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts, UTC)
    if ms:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _run_duration(run: StoredRun) -> float | None:
    if run.started_at is None or run.ended_at is None:
        return None
    return run.ended_at - run.started_at


def _clip(value: object, width: int = 60, *, quote: bool = True) -> str:
    """``value`` on one line, at most about ``width`` characters: a string as a JSON string
    (newlines escaped; plain with its whitespace collapsed if not ``quote``), anything else
    as compact JSON."""
    if isinstance(value, str):
        text = value if quote else " ".join(value.split())
        if len(text) > width:
            text = text[: width - 3] + "..."
        return orjson.dumps(text).decode() if quote else text
    flat = _compact(value)
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _compact(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


def _error_text(error: object) -> str:
    if isinstance(error, Mapping):
        return f"{error.get('type', '?')}: {error.get('message', '')}"
    return "-" if error is None else str(error)


def format_runs_table(runs: Sequence[StoredRun]) -> str:
    """``runs list``: one aligned row per run (times in UTC)."""
    if not runs:
        return "(no runs)"
    header = ("RUN", "USER", "THREAD", "STATE", "STARTED (UTC)", "DURATION", "AGENT", "ERROR")
    rows = [header] + [
        (
            run.run_id,
            run.user_id,
            run.thread_id,
            run.state,
            _utc(run.started_at if run.started_at is not None else run.ended_at),
            _duration(_run_duration(run)),
            run.agent_name or "-",
            str(run.error.get("type", "?")) if run.error else "-",
        )
        for run in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _event_summary(event: Event) -> str:
    data = event.data
    match event.type:
        case "agent_started":
            return f"agent {data.get('agent_name') or '-'}: {_clip(data.get('text', ''))}"
        case "agent_thinking":
            return f"step {data.get('step', '?')}: {_clip(data.get('reasoning', ''))}"
        case "partial_result":
            return _clip(data.get("text", ""))
        case "tool_executing":
            return (
                f"{data.get('tool_name')} {data.get('call_id')} "
                f"{_clip(data.get('parameters', {}), 50)}"
            )
        case "tool_completed":
            summary = (
                f"{data.get('tool_name')} {data.get('call_id')} {data.get('status')} "
                f"in {_tool_ms(data.get('duration_ms'))}"
            )
            if data.get("error") is not None:
                return f"{summary}: {_clip(_error_text(data['error']), 80, quote=False)}"
            return f"{summary} -> {_clip(data.get('results'), 40)}"
        case "agent_completed":
            return f"final: {_clip(data.get('final_response', ''))}"
        case "agent_error":
            return _clip(_error_text(data.get("error")), 100, quote=False)
        case "agent_cancelled":
            return f"reason: {data.get('reason', '-')}"
    return _clip(dict(data), 70)


def _tool_ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"


def _tool_calls(events: Sequence[Event]) -> list[tuple[str, str, str, str]]:
    """(tool name, call id, status, duration) of each call, in the order announced."""
    calls: dict[str, tuple[str, str, str, str]] = {}
    for event in events:
        call_id = event.data.get("call_id")
        if not isinstance(call_id, str):
            continue
        name = str(event.data.get("tool_name"))
        if event.type == "tool_executing":
            calls.setdefault(call_id, (name, call_id, "no result", "-"))
        elif event.type == "tool_completed":
            status = str(event.data.get("status"))
            calls[call_id] = (name, call_id, status, _tool_ms(event.data.get("duration_ms")))
    return list(calls.values())


def format_run_timeline(run: StoredRun, events: Sequence[Event]) -> str:
    """``runs show``: the run's header, one line per event (offset from the start), its tools."""
    usage = " ".join(f"{k}={v}" for k, v in run.usage.items()) if run.usage else "-"
    seqs = f" (seq {events[0].seq}-{events[-1].seq})" if events else ""
    lines = [
        f"run       {run.run_id}",
        f"user      {run.user_id}",
        f"thread    {run.thread_id}",
        f"agent     {run.agent_name or '-'}",
        f"text      {_clip(run.text, 100) if run.text is not None else '-'}",
        f"state     {run.state}",
        f"trace id  {run.trace_id or '-'}",
        f"started   {_utc(run.started_at, ms=True)}",
        f"ended     {_utc(run.ended_at, ms=True)}",
        f"duration  {_duration(_run_duration(run))}",
        f"usage     {usage}",
        f"error     {_error_text(run.error)}",
        f"events    {len(events)}{seqs}",
        "",
    ]
    if events and run.first_seq is not None and events[0].seq > run.first_seq:
        lines.append(f"(events before seq {events[0].seq} were pruned from the store)")
    base = run.started_at if run.started_at is not None else (events[0].ts if events else 0.0)
    lines.extend(
        f"+{(event.ts - base) * 1000:>8.1f} ms  seq {event.seq:<5} {event.type:<16} "
        f"{_event_summary(event)}".rstrip()
        for event in events
    )
    calls = _tool_calls(events)
    if calls:
        lines += ["", f"tools ({len(calls)} call{'s' if len(calls) != 1 else ''})"]
        widths = [max(len(call[i]) for call in calls) for i in range(4)]
        lines.extend(
            f"  {name:<{widths[0]}}  {call_id:<{widths[1]}}  {status:<{widths[2]}}  "
            f"{ms:>{widths[3]}}"
            for name, call_id, status, ms in calls
        )
    return "\n".join(lines)


def _configure_logging(config: Config) -> None:
    """Log to stderr at ``config.log_level``: text lines, or JSON objects (``log_format``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "runs":
            return _runs(args)
        if args.command == "chat":
            return chat_main(args)
        if args.command == "token":
            config = Config.from_args(args)
            ttl = args.ttl if args.ttl is not None else config.token_ttl
            print(issue_token(args.user, load_secret(config), ttl=ttl))
            return 0
        config = Config.from_args(args)
        _configure_logging(config)
        if config.gc_thresholds is not None:
            gc.set_threshold(*parse_gc_thresholds(config.gc_thresholds))
        provider = install_otel_from_env() if config.otel else None
        try:
            trio.run(_serve, config)
        finally:
            if provider is not None:
                provider.shutdown()  # flushes the spans not exported yet
        return 0
    except (NetraError, ValueError) as exc:
        print(f"netra-actors: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
