"""Many clients connect at once and one in ten stops reading: what happens, with figures.

The server is a real ``python -m netra_actors serve`` subprocess on 127.0.0.1
(demo agent, ``--send-timeout``); the load comes from ``--procs`` client
processes (trio, one task per connection) released together by a shared start
event. Every client is a distinct user with its own token and sends
``stream N`` (about N + 3 events, several hundred KB: more than the socket
buffers hold, so a client that does not read really stalls the server's
writer for its connection).

- readers read every frame until their run's terminal event; every stream goes
  through ``netra_actors.testing.LifecycleChecker`` and must hold all the
  run's events (any violation or shortfall fails the benchmark);
- stalled clients (every ``--stalled-every``-th) complete the handshake, send
  the message and never read again, keeping the socket open until the readers
  are done plus a grace period; then they read what is left and report how
  their connection ended (frames received, close code).

Three scenarios, each against a fresh server: ``stalled`` (the one above),
``baseline`` (the same number of clients, all reading) and ``readers-only``
(only the readers of ``stalled``, no stalled client at all: the same reader
work, so any difference is the stalled clients' doing). Measured: handshake
outcomes, connect latency, time until all are connected, reader completion
time, what happened to the stalled ones, server RSS (before / peak / after) and
server CPU (utime+stime from /proc) per delivered event, ``GET /healthz``.

Usage::

    python benchmarks/bench_stalled_clients.py [--clients 1000] [--stalled-every 10]
        [--events 2000] [--procs 4] [--send-timeout 5] [--json out.json] [--quick]

``--quick`` (10 clients, 2000 events; baseline and stalled only) takes under a minute
on a 2-core machine (stream 2000 is kept: fewer events can fit in the socket
buffers, and then a client that does not read never stalls the server); the
full 1,000 x 2,000 profile moves 2 million events per scenario and takes about
ten minutes per scenario there (about 300 us of server CPU per delivered event).
Linux only (/proc); everything is bounded by ``--timeout`` per scenario.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import trio
import trio_websocket

from netra_actors import issue_token
from netra_actors.testing import TERMINAL_EVENTS, LifecycleChecker, LifecycleViolation

HOST = "127.0.0.1"
TCP_CLOSE_WAIT = 8  # tcpi_state: the peer closed its side
BANNER = re.compile(r"serving protocol v1 at (ws://\S+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")

HEALTH_POINTS = ("healthz_before", "healthz_readers_done", "healthz_after_drop", "healthz_end")
Job = tuple[int, str, str, bool]  # (client index, user, token, stalled)


# --- measuring the server from outside ------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # After "pid (comm) ": state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


TCP_STATES = {"01": "established", "04": "fin_wait1", "05": "fin_wait2", "06": "time_wait",
              "07": "close", "08": "close_wait", "09": "last_ack", "0B": "closing"}  # fmt: skip


def tcp_sockets(port: int) -> dict[str, int]:
    """The server side of its connections, from /proc/net/tcp: sockets per TCP state,
    plus ``tx_queue_bytes`` (sent by the server, not yet acknowledged by the peer).

    A socket the server has closed while data it wrote is still unsent stays in
    ``fin_wait1`` (an orphan, owned by the kernel) until the peer reads or the
    kernel gives up on it.
    """
    states: Counter[str] = Counter()
    queued = unread = backlog = 0
    local = f":{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return {}
    # The file is not a consistent snapshot: a socket can be listed twice while the
    # table changes, so count each (local, remote) pair once.
    seen = set()
    for line in lines:
        fields = line.split()
        if (fields[1], fields[2]) in seen:
            continue
        seen.add((fields[1], fields[2]))
        if fields[2].endswith(local):  # a client's socket: what it has not read yet
            unread += int(fields[4].split(":")[1], 16)
        elif not fields[1].endswith(local):
            continue
        elif fields[3] == "0A":  # the listening socket: rx_queue is its accept queue
            backlog = int(fields[4].split(":")[1], 16)
        else:
            states[TCP_STATES.get(fields[3], fields[3])] += 1
            queued += int(fields[4].split(":")[0], 16)
    return {
        **states,
        "tx_queue_bytes": queued,
        "clients_rx_queue_bytes": unread,
        "accept_queue": backlog,
    }


def machine_cpu() -> dict[str, float]:
    """Seconds of CPU time of the whole machine (all CPUs) from /proc/stat: busy, idle, steal."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return {
        "busy": (user + nice + system + irq + softirq) / CLK_TCK,
        "idle": (idle + iowait) / CLK_TCK,
        "steal": steal / CLK_TCK,
    }


async def healthz(port: int, within: float = 5.0) -> dict[str, Any]:
    """``GET /healthz`` over raw HTTP/1.1; the JSON body plus ``http_status``."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
    with trio.fail_after(within):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(request.encode())
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    result: dict[str, Any] = json.loads(body)
    result["http_status"] = int(head.split()[1])
    return result


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def summary(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "max": max(values) if values else None,
    }


# --- the client processes -------------------------------------------------------------------


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def poll_until(condition: Callable[[], bool], period: float) -> None:
    """Return once ``condition()`` holds; for state shared between processes."""
    while True:
        if condition():
            return
        await trio.sleep(period)


async def _wait_mp(event: Any, into: trio.Event, period: float) -> None:
    """Set ``into`` once the multiprocessing ``event`` is set (polled, no thread)."""
    await poll_until(event.is_set, period)
    into.set()


async def _read_run(ws: trio_websocket.WebSocketConnection, rec: dict[str, Any]) -> None:
    """A reader: every frame until the run's terminal event, through the lifecycle checker."""
    checker = LifecycleChecker()
    events = 0
    last_seq = 0
    while True:
        frame = orjson.loads(await ws.get_message())
        rec["frames"] += 1
        checker.feed(frame)
        if "seq" in frame:
            events += 1
            last_seq = frame["seq"]
            if frame["type"] in TERMINAL_EVENTS:
                rec["terminal"] = frame["type"]
                break
        elif frame["type"] == "error":
            rec["error_frames"].append(frame.get("code"))
    report = checker.finish()
    rec["events"] = events
    rec["last_seq"] = last_seq
    rec["checked_events"] = report.events


def unread_bytes(sock: trio.socket.SocketType) -> int:
    """Bytes waiting in the socket's kernel receive queue (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


async def _watch_fin(sock: trio.socket.SocketType, rec: dict[str, Any]) -> None:
    """Note when the peer's FIN arrived (TCP state CLOSE_WAIT), without reading a byte."""
    while True:
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_CLOSE_WAIT:
            rec["fin_at"] = time.monotonic()
            return
        await trio.sleep(0.25)


async def _stall(
    ws: trio_websocket.WebSocketConnection,
    sock: trio.socket.SocketType,
    rec: dict[str, Any],
    probe: trio.Event,
    idle: float,
) -> None:
    """A stalled client: never read until ``probe``; then read what is left, note how it ended."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_fin, sock, rec)
        await probe.wait()
        nursery.cancel_scope.cancel()
    rec["probe_at"] = time.monotonic()
    rec["unread_bytes"] = unread_bytes(sock)
    try:
        while True:
            with trio.fail_after(idle):
                frame = orjson.loads(await ws.get_message())
            rec["frames"] += 1
            if frame.get("type") in TERMINAL_EVENTS:
                rec["terminal"] = frame["type"]
    except trio_websocket.ConnectionClosed as exc:
        rec["ended"] = "closed"
        rec["close_code"] = exc.reason.code if exc.reason else None
    except trio.TooSlowError:
        rec["ended"] = "still_open"


async def _client(
    job: Job,
    port: int,
    events: int,
    probe: trio.Event,
    rec: dict[str, Any],
    readers_done: Any,
    timeouts: dict[str, float],
) -> None:
    index, _user, token, stalled = job
    rec.update(
        index=index,
        stalled=stalled,
        start=time.monotonic(),
        frames=0,
        error_frames=[],
        handshake="error",
    )
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(timeouts["connect"]):
            stream = await trio.open_tcp_stream(HOST, port)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(timeouts["connect"]):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    f"{HOST}:{port}",
                    "/ws",
                    extra_headers=[(b"authorization", f"Bearer {token}".encode())],
                    # A stalled client's reader task blocks on its first message, so it
                    # stops reading the socket: the kernel buffers fill, then the server's.
                    message_queue_size=0 if stalled else 64,
                )
            rec["handshake"] = "ok"
            rec["connected"] = time.monotonic()
            try:
                await ws.send_message(
                    orjson.dumps({"type": "user_message", "text": f"stream {events}"}).decode()
                )
                rec["sent"] = time.monotonic()
                if stalled:
                    await _stall(ws, stream.socket, rec, probe, timeouts["probe_idle"])
                else:
                    with trio.fail_after(timeouts["run"]):
                        await _read_run(ws, rec)
                    rec["done"] = time.monotonic()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await ws.aclose()
                    except Exception as exc:  # noted, but the run's result stands
                        rec["close_error"] = f"{type(exc).__name__}: {exc}"[:300]
                nursery.cancel_scope.cancel()
    except Exception as exc:  # every failure is a result to count
        leaf = _leaf(exc)
        rec["error_at"] = time.monotonic()
        if isinstance(leaf, trio_websocket.ConnectionRejected):
            rec["handshake"] = "refused"
            rec["status"] = leaf.status_code
            rec["error"] = (leaf.body or b"").decode("utf-8", "replace")[:200]
        elif isinstance(leaf, LifecycleViolation):
            rec["violation"] = f"{leaf.rule}: {leaf}"
        else:
            rec["error"] = f"{type(leaf).__name__}: {leaf}"[:300]
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if not stalled:
            with readers_done.get_lock():
                readers_done.value += 1


async def _client_main(
    jobs: list[Job],
    port: int,
    events: int,
    start: Any,
    probe: Any,
    ready: Any,
    readers_done: Any,
    timeouts: dict[str, float],
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [{} for _ in jobs]
    go, probe_now = trio.Event(), trio.Event()
    with trio.move_on_after(timeouts["total"]):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wait_mp, probe, probe_now, 0.05)
            with ready.get_lock():
                ready.value += 1
            await _wait_mp(start, go, 0.001)
            async with trio.open_nursery() as clients:
                for job, rec in zip(jobs, records, strict=True):
                    clients.start_soon(
                        _client, job, port, events, probe_now, rec, readers_done, timeouts
                    )
            nursery.cancel_scope.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    records.append({"process_cpu": usage.ru_utime + usage.ru_stime})
    return records


def client_process(
    proc: int,
    jobs: list[Job],
    port: int,
    events: int,
    start: Any,
    probe: Any,
    ready: Any,
    readers_done: Any,
    results: Any,
    timeouts: dict[str, float],
) -> None:
    """Entry point of one client process: run its connections, put its records on ``results``."""
    try:
        records = trio.run(
            _client_main, jobs, port, events, start, probe, ready, readers_done, timeouts
        )
        results.put((proc, records, None))
    except BaseException as exc:  # report it to the parent rather than let it wait
        results.put((proc, [], f"{type(exc).__name__}: {exc}"))


# --- one scenario ---------------------------------------------------------------------------


class Server:
    """``python -m netra_actors serve`` as a subprocess; stdout drained in the background."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, secret: str) -> None:
        self.cmd = [
            sys.executable, "-m", "netra_actors", "serve",
            "--host", HOST, "--port", "0", "--data-dir", str(data_dir),
            "--send-timeout", str(args.send_timeout), "--log-level", "warning",
            *shlex.split(args.server_args),
        ]  # fmt: skip
        self.env = {**os.environ, "NETRA_ACTORS_SECRET": secret}
        self.log_path = data_dir / "server.log"
        self.stdout = bytearray()
        self.process: trio.Process | None = None
        self.url = ""
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> None:
        log = self.log_path.open("wb")
        self.process = await trio.lowlevel.open_process(
            self.cmd, stdout=subprocess.PIPE, stderr=log, env=self.env
        )
        log.close()
        assert self.process.stdout is not None
        out = self.process.stdout
        with trio.fail_after(30):
            while not (match := BANNER.search(self.stdout.decode("utf-8", "replace"))):
                chunk = await out.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"server exited before its banner: {self.stdout!r}")
                self.stdout += chunk
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
        nursery.start_soon(self._drain, out)

    async def _drain(self, out: trio.abc.ReceiveStream) -> None:
        while chunk := await out.receive_some(4096):
            self.stdout += chunk

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def stop(self) -> dict[str, Any]:
        """SIGTERM (graceful shutdown), SIGKILL after 15 s; exit status and time taken."""
        assert self.process is not None
        began = time.monotonic()
        result: dict[str, Any] = {}
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                result["killed"] = True
                await self.process.wait()
        result["exit_code"] = self.process.returncode
        result["shutdown_s"] = round(time.monotonic() - began, 3)
        log = self.log_path.read_text("utf-8", "replace")
        result["log_errors"] = sum(
            1 for line in log.splitlines() if " ERROR " in line or "Traceback" in line
        )
        result["log_warnings"] = sum(1 for line in log.splitlines() if " WARNING " in line)
        result["log_tail"] = log.splitlines()[-5:]
        return result


def plan(name: str, args: argparse.Namespace) -> list[bool]:
    """Per client: stalled or not. ``stalled``: every k-th; ``baseline``: none;
    ``readers-only``: the readers of ``stalled`` alone."""
    k = args.stalled_every
    pattern = [k > 0 and i % k == k - 1 for i in range(args.clients)]
    if name == "stalled":
        return pattern
    if name == "baseline":
        return [False] * args.clients
    return [False] * pattern.count(False)


async def _sample(pid: int, samples: list[tuple[float, int, float]], period: float) -> None:
    while True:
        samples.append((time.monotonic(), rss_kib(pid), cpu_seconds(pid)))
        await trio.sleep(period)


async def _terminate_on_sigterm(task_status: trio.TaskStatus[None]) -> None:
    """SIGTERM ends the scenario like Ctrl-C, so the server and clients are still killed."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            raise KeyboardInterrupt("SIGTERM")


async def _progress(
    t0: float,
    readers_done: Any,
    timeline: list[dict[str, Any]],
    samples: list[tuple[float, int, float]],
    period: float,
) -> None:
    """A line every ``period`` seconds, for long runs."""
    while True:
        await trio.sleep(period)
        health = timeline[-1] if timeline else {"tcp": {}}
        rss = samples[-1][1] / 1024 if samples else 0
        cpu = samples[-1][2] - samples[0][2] if samples else 0
        print(
            f"    t={time.monotonic() - t0:5.0f}s readers done {readers_done.value}; server: "
            f"established {health['tcp'].get('established')}, "
            f"accept queue {health['tcp'].get('accept_queue')}, "
            f"healthz {health.get('connections')} connections / "
            f"{health.get('active_runs')} active runs in {health.get('healthz_s')} s, "
            f"RSS {rss:.0f} MiB, CPU {cpu:.0f} s",
            flush=True,
        )


async def _sample_health(port: int, readers_done: Any, timeline: list[dict[str, Any]]) -> None:
    """About every second: the server sockets' TCP states, the readers done, and /healthz
    (the server's own counts, and how long it took to answer)."""
    while True:
        began = time.monotonic()
        point: dict[str, Any] = {"t": began, "tcp": tcp_sockets(port), "done": readers_done.value}
        try:
            health = await healthz(port, within=10)
            point["connections"] = health["connections"]
            point["active_runs"] = health["active_runs"]
            point["sessions"] = health["sessions"]
            point["healthz_s"] = round(time.monotonic() - began, 3)
        except (OSError, trio.TooSlowError, ValueError, KeyError):
            point["healthz_s"] = None
        timeline.append(point)
        await trio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))


async def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    stalled_plan = plan(name, args)
    n = len(stalled_plan)
    n_stalled = sum(stalled_plan)
    n_readers = n - n_stalled
    secret = os.urandom(16).hex()
    jobs: list[Job] = [
        (i, f"{name}-{i}", issue_token(f"{name}-{i}", secret.encode(), ttl=3600), s)
        for i, s in enumerate(stalled_plan)
    ]
    out: dict[str, Any] = {
        "scenario": name,
        "clients": n,
        "readers": n_readers,
        "stalled": n_stalled,
        "events_requested": args.events,
    }
    ctx = mp.get_context("spawn")
    start, probe = ctx.Event(), ctx.Event()
    ready, readers_done = ctx.Value("i", 0), ctx.Value("i", 0)
    results = ctx.Queue()
    procs: list[Any] = []
    timeouts = {
        "connect": args.connect_timeout,
        "run": args.timeout,
        "probe_idle": 3.0,
        "total": args.timeout + 30,
    }
    samples: list[tuple[float, int, float]] = []
    health_timeline: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-stalled-") as tmp:
        server = Server(args, Path(tmp), secret)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_terminate_on_sigterm)
                await server.start(nursery)
                out["server_cmd"] = " ".join(server.cmd[1:])
                pid = server.pid
                await trio.sleep(0.5)
                out["healthz_before"] = await healthz(server.port)
                out["rss_before_kib"] = rss_kib(pid)
                for p in range(args.procs):
                    proc_jobs = jobs[p :: args.procs]
                    proc = ctx.Process(
                        target=client_process,
                        args=(
                            p, proc_jobs, server.port, args.events,
                            start, probe, ready, readers_done, results, timeouts,
                        ),
                        daemon=True,
                    )  # fmt: skip
                    proc.start()
                    procs.append(proc)
                with trio.fail_after(60):
                    await poll_until(lambda: ready.value >= args.procs, 0.01)
                await trio.sleep(0.2)
                nursery.start_soon(_sample, pid, samples, 0.2)
                nursery.start_soon(_sample_health, server.port, readers_done, health_timeline)
                pids = [pid, *(proc.pid for proc in procs)]
                cpu0 = [cpu_seconds(p) for p in pids]
                machine0 = machine_cpu()
                t0 = time.monotonic()
                start.set()
                nursery.start_soon(
                    _progress, t0, readers_done, health_timeline, samples, args.progress
                )
                with trio.move_on_after(args.timeout) as waited:
                    await poll_until(lambda: readers_done.value >= n_readers, 0.05)
                if waited.cancelled_caught:
                    out["timed_out"] = f"{readers_done.value}/{n_readers} readers done"
                t_readers = time.monotonic()
                cpu_readers = [cpu_seconds(p) for p in pids]
                machine1 = machine_cpu()
                out["tcp_readers_done"] = tcp_sockets(server.port)
                out["healthz_readers_done"] = await healthz(server.port, within=10)
                if n_stalled:
                    await trio.sleep(args.grace)
                t_after = time.monotonic()
                cpu_after = cpu_seconds(pid)
                out["healthz_after_drop"] = await healthz(server.port, within=10)
                out["rss_after_drop_kib"] = rss_kib(pid)
                out["tcp_after_drop"] = tcp_sockets(server.port)
                probe.set()
                records: list[dict[str, Any]] = []
                process_cpu = []
                for _ in procs:
                    _p, recs, failure = await trio.to_thread.run_sync(
                        results.get, True, timeouts["total"] + 30
                    )
                    if failure:
                        raise RuntimeError(f"client process {_p} failed: {failure}")
                    process_cpu.append(recs.pop()["process_cpu"])
                    records.extend(recs)
                for proc in procs:
                    await trio.to_thread.run_sync(proc.join, 10)
                await trio.sleep(1)
                out["healthz_end"] = await healthz(server.port, within=10)
                out["rss_end_kib"] = rss_kib(pid)
                out["tcp_end"] = tcp_sockets(server.port)
                nursery.cancel_scope.cancel()
            out["server_stop"] = await server.stop()
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            if server.process is not None and server.process.returncode is None:
                server.process.kill()
                with trio.CancelScope(shield=True):
                    await server.process.wait()
    window = [s for s in samples if t0 <= s[0] <= t_after]
    out["rss_peak_kib"] = max((s[1] for s in window), default=0)
    out["client_process_cpu_s"] = [round(c, 2) for c in process_cpu]
    out.update(analyse(records, t0, t_readers, t_after, health_timeline, n_stalled))
    out["timeline"] = [
        {
            "t": round(p["t"] - t0, 2),
            **{k: v for k, v in p.items() if k not in ("t", "tcp")},
            **p["tcp"],
        }
        for p in health_timeline
    ]
    out["rss_timeline_kib"] = [(round(t - t0, 1), rss) for t, rss, _ in samples[::5]]
    cpu_window = cpu_readers[0] - cpu0[0]
    wall = max(t_readers - t0, 1e-9)
    clients_cpu = sum(cpu_readers[1:]) - sum(cpu0[1:])
    busy = machine1["busy"] - machine0["busy"]
    out["cpu_window"] = {
        "wall_s": round(wall, 3),
        "server_s": round(cpu_window, 3),
        "clients_s": round(clients_cpu, 3),
        "others_s": round(busy - cpu_window - clients_cpu, 3),
        "idle_s": round(machine1["idle"] - machine0["idle"], 3),
        "steal_s": round(machine1["steal"] - machine0["steal"], 3),
    }
    delivered = out["reader_events_total"]
    out["server_cpu_s"] = round(cpu_window, 3)
    out["server_cpu_util"] = round(cpu_window / wall, 3)
    out["server_cpu_us_per_event"] = round(cpu_window / delivered * 1e6, 2) if delivered else None
    out["server_cpu_s_incl_grace"] = round(cpu_after - cpu0[0], 3)
    out["readers_done_s"] = round(t_readers - t0, 3)
    return out


def analyse(
    records: list[dict[str, Any]],
    t0: float,
    t_readers: float,
    t_after: float,
    health: list[dict[str, Any]],
    n_stalled: int,
) -> dict[str, Any]:
    handshakes = Counter(r.get("handshake", "missing") for r in records)
    refusals = Counter(r["status"] for r in records if r.get("handshake") == "refused")
    errors = Counter(
        (r.get("error") or "").split(":")[0] for r in records if r.get("handshake") == "error"
    )
    connected = [r for r in records if r.get("handshake") == "ok"]
    # Connected, then failed (connection lost, timeout, lifecycle violation...).
    run_errors = Counter(
        (r.get("error") or r.get("violation") or "").split(":")[0]
        for r in connected
        if "error" in r or "violation" in r
    )
    run_error_at = [r["error_at"] - t0 for r in connected if "error_at" in r]
    connect_lat = [r["connected"] - r["start"] for r in connected]
    readers = [r for r in records if not r["stalled"]]
    done = [r for r in readers if "done" in r]
    per_run = Counter(r["last_seq"] for r in done)
    complete = [
        r
        for r in done
        if r["events"] == r["last_seq"] == r["checked_events"]
        and r["terminal"] == "agent_completed"
    ]
    stalled = [r for r in records if r["stalled"]]
    outcomes = Counter(
        f"{r['ended']} {r.get('close_code')}" if "ended" in r else r.get("error", "not connected")
        for r in stalled
        if r.get("handshake") == "ok"
    )
    stalled_frames = [r["frames"] for r in stalled if "ended" in r]
    fin_after_connect = [r["fin_at"] - r["connected"] for r in stalled if "fin_at" in r]
    result: dict[str, Any] = {
        "handshakes": dict(handshakes),
        "refusals_by_status": {str(k): v for k, v in refusals.items()},
        "errors_by_type": dict(errors),
        "all_connected_s": round(max(r["connected"] for r in connected) - t0, 3)
        if connected
        else None,
        "connect_latency_s": summary(connect_lat),
        "errors_after_connect": dict(run_errors),
        "errors_after_connect_at_s": summary(run_error_at),
        "connect_over_10s": sum(1 for x in connect_lat if x > 10),
        "close_errors": dict(
            Counter(r["close_error"].split(":")[0] for r in records if "close_error" in r)
        ),
        "close_error_examples": [r["close_error"] for r in records if "close_error" in r][:3],
        "accept_queue_max": max((p["tcp"].get("accept_queue", 0) for p in health), default=0),
        "healthz_answer_s": summary(
            [p["healthz_s"] for p in health if p.get("healthz_s") is not None]
        ),
        "healthz_unanswered_10s": sum(1 for p in health if p.get("healthz_s") is None),
        "readers_complete": len(complete),
        "readers_failed": [
            {k: r.get(k) for k in ("index", "error", "violation", "events", "last_seq")}
            for r in readers
            if r not in complete
        ][:20],
        "violations": sum(1 for r in readers if "violation" in r),
        "events_per_run": dict(per_run),
        "reader_events_total": sum(r["events"] for r in done),
        "reader_completion_s": summary([r["done"] - t0 for r in done]),
        "reader_run_s": summary([r["done"] - r["sent"] for r in done]),
        "reader_error_frames": dict(Counter(c for r in readers for c in r["error_frames"])),
    }
    if n_stalled:
        result["stalled_outcomes"] = dict(outcomes)
        result["stalled_frames_after_probe"] = summary(stalled_frames)
        result["stalled_saw_terminal"] = sum(1 for r in stalled if r.get("terminal"))
        result["stalled_fin_seen"] = len(fin_after_connect)
        result["stalled_fin_after_connect_s"] = summary(fin_after_connect)
        result["stalled_unread_kib_at_probe"] = summary(
            [r["unread_bytes"] / 1024 for r in stalled if "unread_bytes" in r]
        )
        # From the 0.5 s samples: when the server had aborted its first / every stalled
        # connection (its side closed, the peer's not: fin_wait1 while unsent data is
        # queued, fin_wait2 once the peer's kernel took it all; readers closing pass
        # through these states briefly too).
        orphans = [
            (p["t"] - t0, p["tcp"].get("fin_wait1", 0) + p["tcp"].get("fin_wait2", 0))
            for p in health
            if p["t"] > t0
        ]
        first = next((t for t, n in orphans if n > 0), None)
        every = next((t for t, n in orphans if n >= n_stalled), None)
        result["stalled_first_aborted_s"] = round(first, 1) if first is not None else None
        result["stalled_all_aborted_s"] = round(every, 1) if every is not None else None
        result["server_half_closed_max"] = max((n for _, n in orphans), default=0)
        result["probe_s"] = round(t_after - t0, 3)
    result["healthz_connections_max"] = max((p.get("connections", 0) for p in health), default=0)
    return result


# --- reporting ------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def print_report(runs: dict[str, dict[str, Any]], ratios: dict[str, Any]) -> None:
    names = list(runs)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, getter: Any) -> None:
        rows.append((label, [getter(runs[n]) for n in names]))

    def lat(key: str, q: str) -> Any:
        return lambda r: fmt(r[key][q])

    row("clients (readers/stalled)", lambda r: f"{r['clients']} ({r['readers']}/{r['stalled']})")
    row("handshakes ok/refused/error", lambda r: "/".join(
        str(r["handshakes"].get(k, 0)) for k in ("ok", "refused", "error")))  # fmt: skip
    row("all connected after (s)", lambda r: fmt(r["all_connected_s"]))
    row("connect latency p50 (s)", lat("connect_latency_s", "p50"))
    row("connect latency p99 (s)", lat("connect_latency_s", "p99"))
    row("connect latency max (s)", lat("connect_latency_s", "max"))
    row("connects slower than 10 s", lambda r: fmt(r["connect_over_10s"]))
    row("accept queue max", lambda r: fmt(r["accept_queue_max"]))
    row("healthz answer p50/max (s), >10 s", lambda r: "/".join(
        fmt(r["healthz_answer_s"][q], digits=2) for q in ("p50", "max"))
        + f", {r['healthz_unanswered_10s']}")  # fmt: skip
    row("client close errors", lambda r: ", ".join(
        f"{k}: {v}" for k, v in r["close_errors"].items()) or "-")  # fmt: skip
    row("readers complete", lambda r: f"{r['readers_complete']}/{r['readers']}")
    row("errors after connect", lambda r: ", ".join(
        f"{k}: {v}" for k, v in r["errors_after_connect"].items()) or "-")  # fmt: skip
    row("events per run", lambda r: ",".join(map(str, r["events_per_run"])) or "-")
    row("reader events total", lambda r: fmt(r["reader_events_total"]))
    row("reader completion p50 (s)", lat("reader_completion_s", "p50"))
    row("reader completion p99 (s)", lat("reader_completion_s", "p99"))
    row("reader completion max (s)", lat("reader_completion_s", "max"))
    row("server RSS before (MiB)", lambda r: fmt(r["rss_before_kib"] / 1024, digits=1))
    row("server RSS peak (MiB)", lambda r: fmt(r["rss_peak_kib"] / 1024, digits=1))
    row("server RSS after drop (MiB)", lambda r: fmt(r["rss_after_drop_kib"] / 1024, digits=1))
    row("server RSS end (MiB)", lambda r: fmt(r["rss_end_kib"] / 1024, digits=1))
    row("server CPU (s) / util", lambda r: f"{r['server_cpu_s']:.2f} / {r['server_cpu_util']:.0%}")
    row("server CPU us/event", lambda r: fmt(r["server_cpu_us_per_event"], digits=1))
    row("client procs CPU (s)", lambda r: fmt(round(sum(r["client_process_cpu_s"]), 1)))
    row("healthz conns before/done/after/end", lambda r: "/".join(
        str(r[k]["connections"]) for k in HEALTH_POINTS))  # fmt: skip
    row("healthz sessions end", lambda r: fmt(r["healthz_end"]["sessions"]))
    row("stalled outcomes", lambda r: ", ".join(
        f"{k}: {v}" for k, v in r.get("stalled_outcomes", {}).items()) or "-")  # fmt: skip
    row("stalled frames read at probe p50/max", lambda r: "/".join(
        fmt(r["stalled_frames_after_probe"][q]) for q in ("p50", "max"))
        if r["stalled"] else "-")  # fmt: skip
    row("stalled aborted: first/all at (s)", lambda r: "/".join(
        fmt(r.get(k)) for k in ("stalled_first_aborted_s", "stalled_all_aborted_s"))
        if r["stalled"] else "-")  # fmt: skip
    row("stalled: FIN seen (n), after connect p50/max", lambda r: (
        f"{r['stalled_fin_seen']}, " + "/".join(
            fmt(r["stalled_fin_after_connect_s"][q], digits=1) for q in ("p50", "max")))
        if r["stalled"] else "-")  # fmt: skip
    row("stalled: unread KiB in kernel at probe p50", lambda r: fmt(
        r["stalled_unread_kib_at_probe"]["p50"], digits=0) if r["stalled"] else "-")  # fmt: skip
    row("server sockets fin_wait1/fin_wait2 after drop", lambda r: "/".join(
        str(r["tcp_after_drop"].get(k, 0)) for k in ("fin_wait1", "fin_wait2")))  # fmt: skip
    row("kernel-queued bytes after drop (KiB)", lambda r: fmt(
        r["tcp_after_drop"].get("tx_queue_bytes", 0) / 1024, digits=0))  # fmt: skip
    row("CPU s: server/clients/others/idle/steal", lambda r: "/".join(
        f"{r['cpu_window'][k]:.0f}" for k in
        ("server_s", "clients_s", "others_s", "idle_s", "steal_s")))  # fmt: skip
    row("server exit / shutdown (s)", lambda r: f"{r['server_stop']['exit_code']} / "
        f"{r['server_stop']['shutdown_s']:.2f}")  # fmt: skip
    row("server log errors/warnings", lambda r: f"{r['server_stop']['log_errors']}/"
        f"{r['server_stop']['log_warnings']}")  # fmt: skip
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    print(" " * width + " | " + " | ".join(n.rjust(c) for n, c in zip(names, cols, strict=True)))
    for label, values in rows:
        cells = " | ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        print(label.ljust(width) + " | " + cells)
    for key, value in ratios.items():
        print(f"{key}: {fmt(value, 'x', 2)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--stalled-every", type=int, default=10)
    parser.add_argument("--events", type=int, default=2000, help="stream N: events per run")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--send-timeout", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=None,
                        help="seconds stalled clients stay silent after the readers are done "
                        "(default send-timeout + 3)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound per scenario (s)")
    parser.add_argument("--connect-timeout", type=float, default=300.0,
                        help="a client gives up its handshake after this long")  # fmt: skip
    parser.add_argument("--scenarios", default=None,
                        help="comma-separated, run in this order "
                        "(default baseline,stalled,readers-only; "
                        "--quick: baseline,stalled)")  # fmt: skip
    parser.add_argument("--server-args", default="", help="extra flags for netra-actors serve")
    parser.add_argument("--progress", type=float, default=30.0, help="seconds between lines")
    parser.add_argument("--quick", action="store_true", help="10 clients, 2000 events")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.events, args.timeout = 10, 2000, min(args.timeout, 60.0)
        args.scenarios = args.scenarios or "baseline,stalled"
    args.scenarios = args.scenarios or "baseline,stalled,readers-only"
    if args.grace is None:
        args.grace = args.send_timeout + 3
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # inherited by the server and the client processes
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(names) - {"stalled", "baseline", "readers-only"}
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    began = time.time()
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"--- scenario {name} ...", flush=True)
        try:
            runs[name] = trio.run(run_scenario, name, args)
        except BaseException as exc:
            if isinstance(_leaf(exc), KeyboardInterrupt):
                print(f"interrupted during {name}; server and clients stopped", file=sys.stderr)
                return 130
            raise
        print_report({name: runs[name]}, {})
        if args.json:  # what is done so far, in case a later scenario fails
            args.json.write_text(json.dumps({"partial": True, "runs": runs}, indent=2) + "\n")
    ratios: dict[str, Any] = {}
    if "stalled" in runs:
        for base in ("baseline", "readers-only"):
            if base not in runs:
                continue
            s, b = runs["stalled"], runs[base]
            p99s, p99b = s["reader_completion_s"]["p99"], b["reader_completion_s"]["p99"]
            us_s, us_b = s["server_cpu_us_per_event"], b["server_cpu_us_per_event"]
            ratios[f"reader completion p99, stalled / {base}"] = (
                p99s / p99b if p99s and p99b else None
            )
            ratios[f"server CPU us/event, stalled / {base}"] = (
                us_s / us_b if us_s and us_b else None
            )
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {args.procs} client processes, "
        f"stream {args.events}, send_timeout {args.send_timeout:g} s, "
        f"wall {time.time() - began:.0f} s"
    )
    print_report(runs, ratios)
    failures = []
    for name, r in runs.items():
        if r["violations"]:
            failures.append(f"{name}: {r['violations']} lifecycle violation(s)")
        if r["readers_complete"] != r["readers"]:
            failures.append(f"{name}: {r['readers'] - r['readers_complete']} reader(s) incomplete")
        if len(r["events_per_run"]) > 1:
            failures.append(f"{name}: runs differ in length {r['events_per_run']}")
        if r.get("timed_out"):
            failures.append(f"{name}: timed out ({r['timed_out']})")
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        payload = {"meta": meta, "runs": runs, "ratios": ratios, "failures": failures}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    for r in runs.values():
        for bad in r["readers_failed"][:5]:
            print(f"  failed reader ({r['scenario']}): {bad}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
