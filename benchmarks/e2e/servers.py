"""Server processes (netra and the baselines) and measuring them from outside (/proc).

Every server is a child process listening on 127.0.0.1, port 0; its URL is read
from the banner it prints. CPU time comes from ``/proc/PID/stat`` (utime + stime,
every thread of the process, so netra's SQLite writer thread counts), memory
from ``VmRSS`` in ``/proc/PID/status``.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from netra_actors import issue_token

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
#: Fixed, so tokens can be made in the harness (``NETRA_ACTORS_SECRET``).
SECRET = "netra-actors-bench-secret-0123456789abcdef"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_BANNER = re.compile(r"at (?:ws|tcp)://127\.0\.0\.1:(\d+)/ws")

#: netra flags for benchmarking: the per-user frame rate limit and the caps raised (the
#: load is many runs from few clients), everything else (persistence, heartbeats, send
#: timeouts, replay windows) at its default.
NETRA_FLAGS = (
    "--log-level", "warning",
    "--rate-limit", "1000000", "--rate-burst", "1000000",
    "--max-connections", "30000", "--max-queued-per-thread", "64",
    "--idle-session-grace", "3600",
)  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sched_seconds(pid: int) -> tuple[float, float]:
    """Seconds the main thread of ``pid`` ran, and waited on a run queue (/proc/PID/schedstat).

    Ran + waited over a window is what the thread wanted: near the whole window means it
    was CPU-bound, even when other jobs on the machine kept it from running all the time.
    """
    try:
        ran, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine (all CPUs) from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return {
        "busy": (user + system + irq + softirq) / CLK_TCK,
        "nice": nice / CLK_TCK,  # other jobs running at a lower priority
        "idle": (idle + iowait) / CLK_TCK,
        "steal": steal / CLK_TCK,
    }


def snapshot(server_pid: int, client_pids: list[int]) -> dict[str, Any]:
    return {
        "t": time.time(),
        "server_cpu": cpu_seconds(server_pid),
        "clients_cpu": [cpu_seconds(p) for p in client_pids],
        "server_sched": sched_seconds(server_pid),
        "clients_sched": [sched_seconds(p) for p in client_pids],
        "machine": machine_cpu(),
    }


def cpu_window(s0: dict[str, Any], s1: dict[str, Any], wall: float | None = None) -> dict[str, Any]:
    """CPU use between two snapshots; utilisations are fractions of one core."""
    wall = wall or max(s1["t"] - s0["t"], 1e-9)
    server = s1["server_cpu"] - s0["server_cpu"]
    clients = [b - a for a, b in zip(s0["clients_cpu"], s1["clients_cpu"], strict=True)]
    m0, m1 = s0["machine"], s1["machine"]
    span = s1["t"] - s0["t"]
    cores = span * (os.cpu_count() or 1)
    waited = s1["server_sched"][1] - s0["server_sched"][1]
    client_demand = [
        (b[0] + b[1] - a[0] - a[1]) / max(span, 1e-9)
        for a, b in zip(s0["clients_sched"], s1["clients_sched"], strict=True)
    ]
    return {
        "server_cpu_s": server,
        "server_util": server / max(span, 1e-9),
        # CPU used (every thread) plus the time the event loop's thread waited for a CPU:
        # what the server wanted, as a share of one core over the window.
        "server_demand": (server + waited) / max(span, 1e-9),
        "server_wait_frac": waited / max(span, 1e-9),
        "clients_cpu_s": sum(clients),
        "client_util_max": max(clients, default=0.0) / max(span, 1e-9),
        "client_demand_max": max(client_demand, default=0.0),
        "machine_idle_frac": (m1["idle"] - m0["idle"]) / max(cores, 1e-9),
        # Processes at a lower priority (nice > 0: they yield to the benchmark).
        "machine_nice_frac": (m1["nice"] - m0["nice"]) / max(cores, 1e-9),
        # Everything at normal priority: the server, the clients and any other job.
        "machine_busy_frac": (m1["busy"] - m0["busy"]) / max(cores, 1e-9),
        "wall_s": wall,
    }


def saturated(window: dict[str, Any]) -> str:
    """Which side limited the rate: the one that wanted a whole core.

    A process that used CPU, or whose event loop waited for one, for at least
    85% of the window was CPU-bound; on a shared machine it may have run
    for less (``server_util``) because other jobs held the CPU meanwhile
    (``server_wait_frac``). ``neither``: both had time to spare (the rate was
    bound by round trips, e.g. few sessions each waiting for its run's end).
    """
    if window["server_demand"] >= 0.85:
        return "server"
    if window["client_demand_max"] >= 0.85:
        return "clients"
    return "neither"


def token(user: str) -> str:
    return issue_token(user, SECRET.encode(), ttl=86_400)


def target(user: str, batch: int = 1) -> str:
    """The request target for ``user``: ``/ws?token=...[&batch=N]`` (every server kind)."""
    query = f"token={token(user)}"
    if batch > 1:
        query += f"&batch={batch}"
    return f"/ws?{query}"


#: Every server process started and not yet stopped (``stop_all`` stops them).
_LIVE: set[ServerProcess] = set()


def stop_all() -> None:
    """Stop every server still running (the harness's last resort, e.g. on SIGTERM)."""
    for server in list(_LIVE):
        server.stop()


class ServerProcess:
    """A server child process: ``netra`` (``python -m netra_actors serve``) or a baseline."""

    def __init__(
        self, kind: str, workdir: Path, store: str = "sqlite", extra: tuple[str, ...] = ()
    ):
        self.kind = kind
        self.framing = "lines" if kind == "trio-tcp" else "ws"
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        if kind == "netra":
            self.cmd = [
                sys.executable, "-m", "netra_actors", "serve", "--host", HOST, "--port", "0",
                "--data-dir", str(workdir), "--store", store, *NETRA_FLAGS, *extra,
            ]  # fmt: skip
        else:
            self.cmd = [sys.executable, "-m", "benchmarks.e2e.baselines", kind, *extra]
        self.env = {
            **os.environ,
            "NETRA_ACTORS_SECRET": SECRET,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = workdir / "server.log"
        self.output: list[bytes] = []
        self._drainer: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.cmd, stdout=subprocess.PIPE, stderr=log, env=self.env, cwd=self.workdir
            )
        _LIVE.add(self)
        assert self.process.stdout is not None
        out = self.process.stdout
        deadline = time.monotonic() + timeout
        seen = b""
        while not (match := _BANNER.search(seen.decode("utf-8", "replace"))):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([out], [], [], max(0.0, left))
            chunk = os.read(out.fileno(), 4096) if ready else b""
            if not chunk:
                self.stop()
                raise RuntimeError(
                    f"{self.kind} server did not start: {seen!r} "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            seen += chunk
        self.output.append(seen)
        self.port = int(match.group(1))
        self._drainer = threading.Thread(target=self._drain, args=(out,), daemon=True)
        self._drainer.start()
        return self

    def _drain(self, out: Any) -> None:
        """Keep reading the server's stdout (so it never blocks on a full pipe) until EOF."""
        with out:
            while chunk := os.read(out.fileno(), 65536):
                self.output.append(chunk)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self) -> dict[str, Any]:
        """SIGTERM (graceful), SIGKILL after 15 s; exit code and what the log says."""
        assert self.process is not None
        _LIVE.discard(self)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        if self._drainer is not None:
            self._drainer.join(5)
        elif self.process.stdout is not None:
            self.process.stdout.close()
        try:
            log = self.log_path.read_text("utf-8", "replace").splitlines()
        except OSError:  # its folder is gone (the harness is being interrupted)
            log = []
        return {
            "exit_code": self.process.returncode,
            "log_errors": sum(1 for line in log if " ERROR " in line or "Traceback" in line),
            "log_tail": log[-3:],
        }

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
