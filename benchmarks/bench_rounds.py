"""Server CPU per event and per run over real WebSockets, with rounds of runs per client.

``netra-actors serve`` runs in a subprocess bound to 127.0.0.1 on a free port; K
trio-websocket clients in this process (one user each) connect, and once every
session is ready each client does R rounds of two runs, ``stream N`` then the
calculator question ``what is 2+3*4?`` (only the calculator with ``--stream 0``),
reading each run until its terminal event (``agent_completed``, ``agent_error`` or
``agent_cancelled``) before sending the next message.

The figures are the server process's own CPU time (user + system, from ``/proc``)
between "every session is ready" and "every client saw its last run end" (so
handshakes and closes are not in it), divided by the events the clients received and
by the runs, plus the CPU of each server thread over the same interval (from
``/proc/PID/task/*/stat``): the main thread runs the trio loop; with ``--store
sqlite`` the other threads are the ``trio.to_thread`` workers that run the SQLite
commits. ``--profile FILE`` runs the server under cProfile (the CPU figures then
include the profiler's overhead); the profile is written when the server exits on
SIGINT at the end. The run fails (exit status 1) unless every client saw every one
of its runs end.

    python benchmarks/bench_rounds.py --clients 100 --stream 100 --rounds 3 --store sqlite
    python benchmarks/bench_rounds.py --clients 10 --stream 0 --store memory --json
    python benchmarks/bench_rounds.py --profile /tmp/server.prof  # python -m pstats ...
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_websocket

from netra_actors import Config, issue_token
from netra_actors._auth import load_secret

SECRET = "bench-rounds-secret-0123456789abcdef012345"
CALC = "what is 2+3*4?"
TERMINAL = ("agent_completed", "agent_error", "agent_cancelled")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_of(stat_path: str) -> tuple[str, float]:
    """(name, user + system CPU seconds) from a ``/proc/.../stat`` file."""
    with open(stat_path) as stat:
        text = stat.read()
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return name, (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (every thread, living or exited)."""
    return _cpu_of(f"/proc/{pid}/stat")[1]


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{thread id: (thread name, CPU seconds)} of the living threads of process ``pid``."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            threads[int(tid)] = _cpu_of(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
    return threads


@attrs.define
class Client:
    """One client's connection and what it saw."""

    user: str
    url: str
    ready: trio.Event = attrs.field(factory=trio.Event)  # ready, or failed before it
    finished: trio.Event = attrs.field(factory=trio.Event)  # last run ended, or failed
    events: int = 0
    ends: collections.Counter[str] = attrs.field(factory=collections.Counter)
    error: str | None = None


async def run_client(
    client: Client, texts: list[str], rounds: int, go: trio.Event, release: trio.Event
) -> None:
    """Connect, wait for ``go``, run ``rounds`` x ``texts``, wait for ``release``, close."""
    try:
        async with trio_websocket.open_websocket_url(
            client.url, message_queue_size=1024, max_message_size=1 << 24
        ) as ws:
            ready = json.loads(await ws.get_message())
            if ready.get("type") != "session_ready":
                raise RuntimeError(f"expected session_ready, got {ready.get('type')!r}")
            client.ready.set()
            await go.wait()
            for _ in range(rounds):
                for text in texts:
                    await ws.send_message(json.dumps({"type": "user_message", "text": text}))
                    ended = False
                    while not ended:
                        message = await ws.get_message()
                        frame = json.loads(message)
                        frames = frame["events"] if frame.get("type") == "events" else [frame]
                        for event in frames:
                            if "seq" in event:
                                client.events += 1
                            if event.get("type") in TERMINAL:
                                client.ends[event["type"]] += 1
                                ended = True
            client.finished.set()
            await release.wait()
    except trio_websocket.ConnectionRejected as exc:
        client.error = f"handshake rejected: {exc.status_code} {(exc.body or b'').decode()[:200]}"
    except (OSError, RuntimeError, ValueError, trio_websocket.HandshakeError) as exc:
        client.error = f"{type(exc).__name__}: {exc}"
    except trio_websocket.ConnectionClosed as exc:
        client.error = f"connection closed: {exc.reason}"
    finally:
        client.ready.set()
        client.finished.set()


@attrs.frozen
class Window:
    """CPU snapshots taken at both ends of the measured interval."""

    wall: float
    cpu: float
    threads: dict[int, tuple[str, float]]

    @classmethod
    def take(cls, pid: int) -> Window:
        return cls(time.monotonic(), process_cpu(pid), thread_cpu(pid))


async def drive(
    url: str, pid: int, clients: int, texts: list[str], rounds: int, time_limit: float
) -> tuple[list[Client], Window, Window, bool]:
    """Run every client; the windows bracket the rounds. The bool: finished in time."""
    key = load_secret(Config(secret=SECRET))
    people = [
        Client(f"user{i}", f"{url}?token={issue_token(f'user{i}', key)}") for i in range(clients)
    ]
    go, release = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        for client in people:
            nursery.start_soon(run_client, client, texts, rounds, go, release)
        in_time = False
        with trio.move_on_after(time_limit):
            for client in people:
                await client.ready.wait()
            start = Window.take(pid)
            go.set()
            for client in people:
                await client.finished.wait()
            in_time = True
        end = Window.take(pid)
        if not go.is_set():  # timed out while connecting
            start = end
        release.set()
        if not in_time:
            nursery.cancel_scope.cancel()
    return people, start, end, in_time


def start_server(store: str, extra: list[str], data_dir: str, profile: str | None) -> tuple[
    subprocess.Popen[str], str, collections.deque[str]
]:  # fmt: skip
    """Start ``netra-actors serve`` on 127.0.0.1:0; return it, its URL and its last lines."""
    prefix = [sys.executable]
    if profile:
        prefix += ["-m", "cProfile", "-o", str(Path(profile).resolve())]
    repo = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, NETRA_ACTORS_SECRET=SECRET, PYTHONPATH=pythonpath)
    server = subprocess.Popen(
        [
            *prefix, "-m", "netra_actors", "serve", "--host", "127.0.0.1", "--port", "0",
            "--store", store, "--data-dir", data_dir, "--log-level", "warning",
            "--rate-limit", "1000000", "--rate-burst", "1000000",
            "--max-queued-per-thread", "64", *extra,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    lines: collections.deque[str] = collections.deque(maxlen=40)
    url = None
    for line in server.stdout:
        lines.append(line)
        found = re.search(r"(ws://127\.0\.0\.1:\d+/ws)", line)
        if found:
            url = found.group(1)
            break
    if url is None:
        server.wait()
        raise SystemExit("the server did not start:\n" + "".join(lines))
    # Keep reading what it prints, so a full pipe never blocks it.
    threading.Thread(target=lines.extend, args=(server.stdout,), daemon=True).start()
    return server, url, lines


def stop_server(server: subprocess.Popen[str]) -> int:
    """SIGINT (graceful shutdown; cProfile writes its file), then SIGKILL if it hangs."""
    server.send_signal(signal.SIGINT)
    try:
        return server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    texts = [f"stream {args.stream}", CALC] if args.stream else [CALC]
    with tempfile.TemporaryDirectory(prefix="bench-rounds-") as data_dir:
        server, url, lines = start_server(args.store, args.server_arg, data_dir, args.profile)
        try:
            people, start, end, in_time = trio.run(
                drive, url, server.pid, args.clients, texts, args.rounds, args.timeout
            )
        finally:
            status = stop_server(server)
    runs = args.clients * args.rounds * len(texts)
    events = sum(c.events for c in people)
    ends: collections.Counter[str] = sum((c.ends for c in people), collections.Counter())
    cpu, wall = end.cpu - start.cpu, end.wall - start.wall
    threads = []
    for tid, (name, cpu1) in sorted(end.threads.items()):
        cpu0 = start.threads.get(tid, (name, 0.0))[1]
        role = "main" if tid == server.pid else "worker"
        threads.append({"tid": tid, "name": name, "role": role, "cpu_s": round(cpu1 - cpu0, 3)})
    exited = cpu - sum(t["cpu_s"] for t in threads)
    problems = [f"{c.user}: {c.error}" for c in people if c.error]
    short = [c for c in people if sum(c.ends.values()) != args.rounds * len(texts)]
    if short:
        problems.append(
            f"{len(short)} of {args.clients} clients did not see every run end "
            f"({sum(ends.values())} of {runs} terminal events)"
        )
    if not in_time:
        problems.append(f"timed out after {args.timeout:.0f} s")
    return {
        "clients": args.clients,
        "stream": args.stream,
        "rounds": args.rounds,
        "store": args.store,
        "server_args": args.server_arg,
        "runs": runs,
        "ended_runs": sum(ends.values()),
        "completed_runs": ends["agent_completed"],
        "errored_runs": ends["agent_error"],
        "cancelled_runs": ends["agent_cancelled"],
        "events": events,
        "wall_s": round(wall, 3),
        "server_cpu_s": round(cpu, 3),
        "server_us_per_event": round(cpu / events * 1e6, 1) if events else None,
        "server_ms_per_run": round(cpu / runs * 1e3, 3) if runs else None,
        "events_per_s": round(events / wall) if wall > 0 else None,
        "main_thread_cpu_s": round(sum(t["cpu_s"] for t in threads if t["role"] == "main"), 3),
        "worker_threads_cpu_s": round(
            sum(t["cpu_s"] for t in threads if t["role"] == "worker") + max(exited, 0.0), 3
        ),
        "threads": threads,
        "exited_threads_cpu_s": round(max(exited, 0.0), 3),
        "server_exit_status": status,
        "server_output_tail": list(lines) if problems else [],
        "profile": str(Path(args.profile).resolve()) if args.profile else None,
        "problems": problems,
        "ok": not problems,
    }


def report(r: dict[str, Any]) -> str:
    extra = f" {' '.join(r['server_args'])}" if r["server_args"] else ""
    us = "-" if r["server_us_per_event"] is None else f"{r['server_us_per_event']:.1f}"
    ms = "-" if r["server_ms_per_run"] is None else f"{r['server_ms_per_run']:.2f}"
    lines = [
        f"clients={r['clients']} stream={r['stream']} rounds={r['rounds']} "
        f"store={r['store']}{extra}: {r['events']} events, {r['runs']} runs "
        f"({r['completed_runs']} completed, {r['ended_runs']} ended), "
        f"server {us} us CPU/event, {ms} ms CPU/run, {r['events_per_s']} events/s",
        f"  server CPU {r['server_cpu_s']:.2f} s over {r['wall_s']:.2f} s: "
        f"main thread {r['main_thread_cpu_s']:.2f} s, "
        f"other threads {r['worker_threads_cpu_s']:.2f} s",
    ]
    for t in r["threads"]:
        if t["cpu_s"] >= 0.01:
            lines.append(f"  thread {t['tid']} {t['role']:<6} {t['name']!r:<18} {t['cpu_s']:.2f} s")
    if r["exited_threads_cpu_s"] >= 0.01:
        lines.append(f"  threads that exited during the run {r['exited_threads_cpu_s']:.2f} s")
    if r["profile"]:
        lines.append(f"  profile: {r['profile']} (python -m pstats {r['profile']})")
    for problem in r["problems"]:
        lines.append(f"FAILED: {problem}")
    if r["problems"] and r["server_output_tail"]:
        lines.append("server output (last lines):\n" + "".join(r["server_output_tail"]).rstrip())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100, help="clients, one user each")
    parser.add_argument("--stream", type=int, default=100, help="N of 'stream N' (0: no stream)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of runs per client")
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    parser.add_argument("--profile", metavar="FILE", help="run the server under cProfile")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result) if args.json else report(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
