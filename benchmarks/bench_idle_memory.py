"""Memory of idle sessions: RSS growth per session with one idle WebSocket each.

The runtime and the gateway run in this process (``Runtime`` + ``serve`` on
127.0.0.1, a free port, a temporary data folder); a client subprocess opens N
WebSocket connections to it over raw sockets (one user each, so N sessions), waits
for every ``session_ready``, then holds them open without sending anything. The
figure is this process's resident memory (``/proc/self/statm``) after the sessions
are up minus before, per session, in KiB; and the trio tasks alive per session. The
run fails (exit status 1) unless the runtime counts exactly N more sessions and
connections at the end.

``--trace`` also runs ``tracemalloc`` (25 frames) over the same interval and prints
where the growth was allocated per session, by file and by line, and the trio
tasks per session by name (walked from ``trio.lowlevel.current_root_task()``).
tracemalloc's own bookkeeping is then part of the RSS figure: read the RSS growth
from a run without ``--trace``.

    python benchmarks/bench_idle_memory.py --sessions 1000
    python benchmarks/bench_idle_memory.py --sessions 1000 --store memory --trace
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from netra_actors import Config, Runtime, issue_token, serve
from netra_actors._auth import load_secret

SECRET = "bench-idle-memory-secret-0123456789abcdef01"

#: The client subprocess: reads its port and tokens on its first stdin line, opens one
#: connection per token, prints ``ready`` once each got ``session_ready``, then holds
#: them until its stdin closes (so it also ends when this process dies).
CLIENT = r"""
import base64, os, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, *tokens = sys.stdin.readline().split()
socks = []
for token in tokens:
    s = socket.create_connection(("127.0.0.1", int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )
    socks.append(s)
for i, s in enumerate(socks):
    data = b""
    while b"session_ready" not in data:
        chunk = s.recv(65536)
        if not chunk:
            print(f"error: connection {i} closed before session_ready: {data[:300]!r}", flush=True)
            sys.exit(1)
        data += chunk
print("ready", flush=True)
sys.stdin.read()
"""


def rss_kib() -> int:
    """This process's resident set size, KiB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def task_names() -> collections.Counter[str]:
    """Living trio tasks by (short) name, from the root task down."""
    names: collections.Counter[str] = collections.Counter()

    def walk(task: trio.lowlevel.Task) -> None:
        names[".".join(task.name.split(".")[-2:])[:60]] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_sessions(port: int, tokens: list[str], time_limit: float) -> trio.Process:
    """Start the client subprocess; return it once every session is ready."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        await process.stdin.send_all((" ".join([str(port), *tokens]) + "\n").encode())
        output = b""
        with trio.fail_after(time_limit):
            while b"ready\n" not in output and b"error" not in output:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    break
                output += chunk
        if not output.startswith(b"ready"):
            raise RuntimeError(f"the client failed: {output.decode(errors='replace')[:500]}")
    except BaseException:
        await close_client(process)
        raise
    return process


async def close_client(process: trio.Process) -> None:
    """Close its stdin (it exits on its own), kill it if it has not after 5 s, reap it."""
    with trio.CancelScope(shield=True):
        if process.stdin is not None:
            await process.stdin.aclose()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


def growth(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, key: str, n: int, top: int
) -> list[dict[str, Any]]:
    """The ``top`` largest growths between two snapshots, per session."""
    rows = []
    for stat in after.compare_to(before, key)[:top]:
        frame = stat.traceback[0]
        where = frame.filename if key == "filename" else f"{frame.filename}:{frame.lineno}"
        rows.append(
            {
                "where": where,
                "bytes_per_session": round(stat.size_diff / n),
                "blocks_per_session": round(stat.count_diff / n, 2),
            }
        )
    return rows


async def measure(args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    n = args.sessions
    config = Config(
        store=args.store,
        data_dir=Path(data_dir),
        secret=SECRET,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        max_connections=max(10000, n + 100),
        rate_limit=1e6,
        rate_burst=1000000,
        idle_session_grace=3600.0,
        # The raw clients never answer a ping: without this, a slow (--trace) run of many
        # sessions would see the first connections aborted by the heartbeat.
        heartbeat_interval=3600.0,
    )
    key = load_secret(config)
    tokens = [issue_token(f"user{i}", key) for i in range(n)]
    result: dict[str, Any] = {"sessions": n, "store": args.store, "trace": args.trace}
    async with Runtime(config) as runtime, trio.open_nursery() as nursery:
        info = await nursery.start(serve, runtime, config)
        gc.collect()
        stats0 = runtime.statistics()
        tasks0 = task_names()
        if args.trace:
            tracemalloc.start(25)
            snap0 = tracemalloc.take_snapshot()
        rss0 = rss_kib()
        client = await open_sessions(info.port, tokens, args.timeout)
        try:
            await trio.sleep(args.settle)
            gc.collect()
            rss1 = rss_kib()
            stats1 = runtime.statistics()
            tasks1 = task_names()
            if args.trace:
                filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
                snap1 = tracemalloc.take_snapshot().filter_traces(filters)
                snap0 = snap0.filter_traces(filters)
                tracemalloc.stop()
                traced = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
                result["traced_kib_per_session"] = round(traced / n / 1024, 2)
                result["by_file"] = growth(snap0, snap1, "filename", n, args.top)
                result["by_line"] = growth(snap0, snap1, "lineno", n, args.top)
        finally:
            await close_client(client)
            nursery.cancel_scope.cancel()
    sessions = stats1.sessions - stats0.sessions
    connections = stats1.connections - stats0.connections
    problems = [
        f"{what}: {count} opened, not {n}"
        for what, count in (("sessions", sessions), ("connections", connections))
        if count != n
    ]
    tasks = {
        name: round((tasks1[name] - tasks0[name]) / n, 2)
        for name, _ in (tasks1 - tasks0).most_common()
    }
    result.update(
        sessions_opened=sessions,
        connections_opened=connections,
        rss_before_kib=rss0,
        rss_after_kib=rss1,
        rss_kib_per_session=round((rss1 - rss0) / n, 2),
        tasks_before=sum(tasks0.values()),
        tasks_after=sum(tasks1.values()),
        tasks_per_session=round((sum(tasks1.values()) - sum(tasks0.values())) / n, 2),
        tasks_per_session_by_name=tasks,
        problems=problems,
        ok=not problems,
    )
    return result


def report(r: dict[str, Any], top: int) -> str:
    lines = [
        f"sessions={r['sessions']} store={r['store']}: RSS growth "
        f"{r['rss_kib_per_session']:.1f} KiB/session "
        f"({r['rss_before_kib'] / 1024:.1f} -> {r['rss_after_kib'] / 1024:.1f} MiB), "
        f"{r['tasks_per_session']:.2f} trio tasks/session"
        + (" (tracemalloc on: RSS includes its bookkeeping)" if r["trace"] else "")
    ]
    if r["trace"]:
        lines.append(f"traced growth {r['traced_kib_per_session']:.1f} KiB/session")
        lines.append("--- by file")
        for row in r["by_file"]:
            lines.append(
                f"{row['bytes_per_session']:8d} B/session {row['blocks_per_session']:6.1f} "
                f"blocks  {row['where'][-70:]}"
            )
        lines.append("--- by line")
        for row in r["by_line"]:
            lines.append(f"{row['bytes_per_session']:8d} B/session  {row['where'][-90:]}")
        lines.append("--- trio tasks per session, by name")
        for name, count in list(r["tasks_per_session_by_name"].items())[:top]:
            lines.append(f"{count:5.2f} tasks/session  {name}")
    lines.extend(f"FAILED: {problem}" for problem in r["problems"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions to open")
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--trace", action="store_true", help="tracemalloc and task breakdown")
    parser.add_argument("--top", type=int, default=25, help="rows of each breakdown")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait once ready")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to open them")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-idle-memory-") as data_dir:
        result = trio.run(measure, args, data_dir)
    print(json.dumps(result) if args.json else report(result, args.top))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
