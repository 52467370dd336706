"""The load: client worker processes, each holding many connections on one epoll loop.

Why not trio (or any WebSocket library) here: a client task per connection
costs a wake-up, an epoll registration and a task switch per read; with 1,000
connections each read carries one or two frames, and the clients then spend
more CPU per event than the server they are supposed to saturate. One
level-triggered ``select.epoll`` per process, non-blocking sockets, and a
short pause between polls in throughput windows (so each ``recv`` takes every
frame that arrived meanwhile) keep a client at a few microseconds per event.

The parent (:class:`ClientPool`, synchronous) talks to each worker over a
``multiprocessing`` pipe, one command at a time:

- ``("open", host, port, framing, targets, spec)``: connect every target
  (``/ws?token=...``: the handshake by hand), wait for each connection's first
  frame (``session_ready``); reply ``("opened", stats)``. Connections stay
  open, answering pings, until ``close``.
- ``("run", action)``: drive the connections (see :meth:`Worker.start_action`);
  reply ``("ran", counts and times)`` as soon as the last expected event
  arrived, so the parent can close its measuring window.
- ``("analyse", keep_latencies)``: decode what was recorded since the last
  ``analyse``, feed it to each connection's ``LifecycleChecker``, compute
  latencies (``ts`` to the receipt of the chunk that held the event).
- ``("close",)``: close every connection, finish the checkers; ``("closed", ...)``.
- ``("exit",)``.

While measuring, a connection only splits frames (headers only), counts
events (``"seq":`` per event, so ``events`` frames count all theirs), spots
terminal events in the raw bytes, and appends ``(receipt time, payload)`` to a
log; the JSON is decoded after the window.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import multiprocessing as mp
import multiprocessing.connection
import select
import socket
import time
import traceback
from array import array
from typing import Any

import orjson

from netra_actors.testing import LifecycleChecker, LifecycleViolation

from . import wire

RECEIVE_BYTES = 256 * 1024
#: Recorded payload bytes per worker before recording stops (the streams past it are
#: counted, not checked, and reported as unchecked: the run then fails).
DEFAULT_RECORD_CAP = 768 * 1024 * 1024
#: Handshakes in flight per worker (the server's accept queue is finite).
CONNECTING = 100

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


class Connection:
    """One client connection: its socket, counters, and the frames recorded for analysis."""

    def __init__(self, index: int, target: str, framing: str) -> None:
        self.index = index
        self.target = target
        self.framing = framing
        self.sock: socket.socket | None = None
        self.state = "new"  # new, connecting, handshake, upgraded, open, closed
        self.head = b""
        self.accept = b""
        self.parser: wire.FrameParser | wire.LineParser = (
            wire.LineParser() if framing == "lines" else wire.FrameParser()
        )
        self.outbox = b""
        self.frames = 0
        self.events = 0
        self.terminals = 0
        self.sent = 0
        self.error_frames = 0
        self.t_last = 0.0
        self.t_open = 0.0
        self.connect_s = 0.0
        self.error: str | None = None
        self.log: list[tuple[float, bytes]] = []
        self.unrecorded = 0  # events not recorded (over the cap): this stream is not checked
        self.checker = LifecycleChecker()
        self.violation: str | None = None
        # the current action
        self.texts: list[bytes] = []
        self.wait_for = 0  # terminals awaited before the next step
        self.scheduled = False  # paced: sends still to come

    def message(self, payload: bytes) -> bytes:
        """One text message on the wire (a masked WebSocket frame, or a line)."""
        if self.framing == "lines":
            return payload + b"\n"
        return wire.client_frame(wire.TEXT, payload)


class Worker:
    """A client worker's connections, its epoll loop, and the actions run on them."""

    def __init__(self, pipe: mp.connection.Connection) -> None:
        self.pipe = pipe
        self.epoll = select.epoll()
        self.epoll.register(pipe.fileno(), _IN)
        self.by_fd: dict[int, Connection] = {}
        self.connections: list[Connection] = []
        self.record_cap = DEFAULT_RECORD_CAP
        self.recorded_bytes = 0
        self.read_pause = 0.0
        self.full_read = False
        self.action: dict[str, Any] | None = None
        self.timers: list[tuple[float, int]] = []  # (due, connection index) of paced sends
        self.until = 0.0
        self.deadline = 0.0
        self.skipped = 0
        self.before: dict[int, tuple[int, int, int, int]] = {}
        self.t_start = 0.0
        self.pending_open: list[Connection] = []
        self.opening = 0
        self.in_open = False
        self.busy: set[int] = set()  # connections the current action still waits for
        self.index: dict[int, Connection] = {}
        self.host, self.port = "", 0
        self.open_began = 0.0
        self.open_timeout = 0.0  # per connection, handshake and session_ready included
        self.in_flight: dict[int, Connection] = {}
        self.paced_message = b""

    # --- the loop ------------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            timeout = 0.05
            if self.timers:
                timeout = min(timeout, max(0.0, self.timers[0][0] - time.time()))
            ready = self.epoll.poll(timeout)
            now = time.time()
            for fd, mask in ready:
                if fd == self.pipe.fileno():
                    continue
                conn = self.by_fd.get(fd)
                if conn is not None:
                    self._ready(conn, mask, now)
            if self.timers:
                self._fire_timers()
            if self.in_open:
                self._progress_open()
            if self.action is not None:
                self._check_action()
            if self.pipe.poll():
                command = self.pipe.recv()
                if command[0] == "exit":
                    return
                self._command(command)
            # A full buffer means more is waiting: read again at once.
            if self.read_pause and self.action is not None and not self.full_read:
                time.sleep(self.read_pause)
            self.full_read = False

    def _command(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "open":
            _, host, port, framing, targets, spec = command
            self.record_cap = spec.get("record_cap", DEFAULT_RECORD_CAP)
            self.connections = [Connection(i, t, framing) for i, t in targets]
            self.pending_open = list(self.connections)
            self.host, self.port = host, port
            self.open_began = time.time()
            self.open_timeout = spec.get("connect_timeout", 60.0)
            self.in_open = True
            self._progress_open()
        elif kind == "run":
            self.start_action(command[1])
        elif kind == "analyse":
            self.pipe.send(("analysed", self.analyse(command[1])))
        elif kind == "close":
            self.pipe.send(("closed", self.close()))
        else:
            raise ValueError(f"unknown command {kind!r}")

    # --- opening -----------------------------------------------------------------------------

    def _progress_open(self) -> None:
        while self.pending_open and self.opening < CONNECTING:
            conn = self.pending_open.pop()
            self._connect(conn)
        now = time.time()
        for conn in list(self.in_flight.values()):
            if now - conn.t_open > self.open_timeout:
                self._fail(conn, "connect: timed out")
        if not self.pending_open and self.opening == 0:
            self.in_open = False
            times = sorted(c.connect_s for c in self.connections if c.state == "open")
            errors = [c.error for c in self.connections if c.error]
            self.pipe.send(("opened", {
                "connections": len(self.connections),
                "failed": len(errors),
                "errors": errors[:5],
                "open_s": now - self.open_began,
                "connect_p99_s": times[int(len(times) * 0.99)] if times else None,
            }))  # fmt: skip

    def _connect(self, conn: Connection) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = sock
        conn.state = "connecting"
        conn.t_open = time.time()
        self.opening += 1
        self.in_flight[conn.index] = conn
        self.by_fd[sock.fileno()] = conn
        code = sock.connect_ex((self.host, self.port))
        if code not in (0, errno.EINPROGRESS):
            self._fail(conn, f"connect: {errno.errorcode.get(code, code)}")
            return
        self.epoll.register(sock.fileno(), _OUT)

    def _handshake_sent(self, conn: Connection) -> None:
        assert conn.sock is not None
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(conn, f"connect: {errno.errorcode.get(code, code)}")
            return
        if conn.framing == "lines":
            request = conn.target.encode() + b"\n"
        else:
            request, conn.accept = wire.handshake_request(self.host, self.port, conn.target)
        conn.state = "handshake"
        self.epoll.modify(conn.sock.fileno(), _IN)
        self._send(conn, request)

    def _opened(self, conn: Connection) -> None:
        conn.state = "open"
        conn.connect_s = time.time() - conn.t_open
        self.opening -= 1
        self.in_flight.pop(conn.index, None)

    def _fail(self, conn: Connection, why: str) -> None:
        if conn.error is None and conn.state != "closed":
            conn.error = why[:200]
        if conn.state in ("connecting", "handshake", "upgraded"):
            self.opening -= 1
            self.in_flight.pop(conn.index, None)
        conn.state = "closed"
        self.busy.discard(conn.index)
        if conn.sock is not None:
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.epoll.unregister(conn.sock.fileno())
            self.by_fd.pop(conn.sock.fileno(), None)
            conn.sock.close()

    # --- reading -------------------------------------------------------------------------------

    def _ready(self, conn: Connection, mask: int, now: float) -> None:
        if conn.state == "connecting":
            self._handshake_sent(conn)
            return
        if mask & _OUT and conn.outbox:
            self._send(conn, b"")
        if not mask & (_IN | select.EPOLLHUP | select.EPOLLERR):
            return
        assert conn.sock is not None
        try:
            data = conn.sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(conn, f"{type(exc).__name__}: {exc}")
            return
        if not data:
            self._fail(conn, "EOF from the server")
            return
        if len(data) == RECEIVE_BYTES:
            self.full_read = True
        if conn.state == "handshake" and conn.framing != "lines":
            conn.head += data
            if b"\r\n\r\n" not in conn.head:
                return
            head, _, data = conn.head.partition(b"\r\n\r\n")
            conn.head = b""
            conn.state = "upgraded"
            try:
                wire.check_handshake_response(head, conn.accept)
            except ConnectionError as exc:
                self._fail(conn, f"connect: {exc}")
                return
            if not data:
                return
        try:
            messages = conn.parser.feed(data)
        except ValueError as exc:
            self._fail(conn, f"bad frame: {exc}")
            return
        self._messages(conn, messages, now)

    def _messages(self, conn: Connection, messages: list[tuple[int, bytes]], now: float) -> None:
        seq_key = wire.SEQ_KEY
        log = conn.log
        for opcode, payload in messages:
            if opcode == wire.TEXT:
                conn.frames += 1
                n = payload.count(seq_key)
                if n:
                    conn.events += n
                    if self.recorded_bytes < self.record_cap:
                        log.append((now, payload))
                        self.recorded_bytes += len(payload)
                    else:
                        conn.unrecorded += n
                    k = len(wire.TERMINAL_RE.findall(payload))
                    if k:
                        conn.terminals += k
                        conn.t_last = now
                        if self.action is not None:
                            self._terminal(conn)
                else:
                    log.append((now, payload))
                    if payload.startswith(b'{"type":"error"'):
                        conn.error_frames += 1
                    if conn.state in ("handshake", "upgraded"):
                        self._opened(conn)
            elif opcode == wire.PING:
                self._send(conn, wire.client_frame(wire.PONG, payload))
            elif opcode == wire.CLOSE:
                code = int.from_bytes(payload[:2], "big") if payload else None
                self._fail(conn, f"closed by the server, code {code}")
                return

    def _send(self, conn: Connection, data: bytes) -> None:
        if conn.sock is None or conn.state == "closed":
            return
        data = conn.outbox + data
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(conn, f"send: {type(exc).__name__}: {exc}")
            return
        conn.outbox = data[sent:]
        self.epoll.modify(conn.sock.fileno(), _IN | _OUT if conn.outbox else _IN)

    # --- actions -------------------------------------------------------------------------------

    def start_action(self, action: dict[str, Any]) -> None:
        """Start ``action`` on every live connection; ``("ran", ...)`` is sent when it is done.

        ``messages``: each connection sends ``texts`` one after another, each once
        the previous run's terminal event arrived (closed loop, as fast as it goes).

        ``paced``: each connection sends ``text`` every ``interval`` seconds from
        ``start + lead + offset`` (its own offset, spreading the load) for
        ``duration`` seconds, whatever the replies (open loop); a send is skipped
        when ``max_outstanding`` of its runs are still going. Then the
        outstanding runs are awaited.
        """
        self.action = action
        self.read_pause = action.get("read_pause", 0.0)
        self.t_start = time.time()
        self.deadline = self.t_start + action["timeout"]
        self.skipped = 0
        live = [c for c in self.connections if c.state == "open"]
        self.before = {c.index: (c.events, c.frames, c.terminals, c.sent) for c in live}
        self.index = {c.index: c for c in live}
        self.busy = set(self.index)
        if action["action"] == "messages":
            texts = [wire.user_message(t) for t in action["texts"]]
            for conn in live:
                conn.texts = list(reversed(texts))
                self._next_message(conn)
        else:
            lead = action.get("lead", 0.2)
            self.until = self.t_start + lead + action["duration"]
            self.paced_message = wire.user_message(action["text"])
            for conn in live:
                due = self.t_start + lead + action["offsets"][conn.index]
                conn.scheduled = due < self.until
                if conn.scheduled:
                    heapq.heappush(self.timers, (due, conn.index))
                else:
                    self.busy.discard(conn.index)

    def _next_message(self, conn: Connection) -> None:
        if conn.texts:
            conn.wait_for = conn.terminals + 1
            conn.sent += 1
            self._send(conn, conn.message(conn.texts.pop()))
        else:
            self.busy.discard(conn.index)

    def _terminal(self, conn: Connection) -> None:
        assert self.action is not None
        if self.action["action"] == "messages":
            if conn.terminals >= conn.wait_for:
                self._next_message(conn)
        elif not conn.scheduled and conn.terminals >= conn.sent:
            self.busy.discard(conn.index)

    def _fire_timers(self) -> None:
        assert self.action is not None
        now = time.time()
        while self.timers and self.timers[0][0] <= now:
            due, index = heapq.heappop(self.timers)
            conn = self.index[index]
            if conn.state != "open":
                continue
            if conn.sent - conn.terminals < self.action["max_outstanding"]:
                conn.sent += 1
                self._send(conn, conn.message(self.paced_message))
            else:
                self.skipped += 1
            due += self.action["interval"]
            if due < self.until:
                heapq.heappush(self.timers, (due, index))
            else:
                conn.scheduled = False
                if conn.terminals >= conn.sent:
                    self.busy.discard(index)

    def _check_action(self) -> None:
        timed_out = time.time() > self.deadline
        if self.busy and not timed_out:
            return
        live = list(self.index.values())
        self.action = None
        self.read_pause = 0.0
        self.timers = []
        before = self.before
        ends = [c.t_last for c in live if c.terminals > before[c.index][2]]
        for conn in live:
            conn.texts = []
        self.pipe.send(("ran", {
            "t_start": self.t_start,
            "t_end": max(ends, default=self.t_start),
            "events": sum(c.events - before[c.index][0] for c in live),
            "frames": sum(c.frames - before[c.index][1] for c in live),
            "runs_sent": sum(c.sent - before[c.index][3] for c in live),
            "runs_done": sum(c.terminals - before[c.index][2] for c in live),
            "incomplete": sum(1 for c in live if c.terminals < c.sent),
            "skipped_sends": self.skipped,
            "timed_out": timed_out,
            "errors": [c.error for c in self.connections if c.error][:5],
            "failed": sum(1 for c in self.connections if c.error),
            "error_frames": sum(c.error_frames for c in self.connections),
        }))  # fmt: skip

    # --- after the window ------------------------------------------------------------------

    def analyse(self, keep_latencies: bool) -> dict[str, Any]:
        """Decode and check what was recorded since the last call; latencies in seconds."""
        latencies = array("d")
        decoded = 0
        for conn in self.connections:
            log, conn.log = conn.log, []
            if conn.unrecorded or conn.violation:
                continue
            for received, payload in log:
                frame = orjson.loads(payload)
                try:
                    conn.checker.feed(frame)
                except LifecycleViolation as exc:
                    conn.violation = f"{exc.rule}: {exc}"[:300]
                    break
                kind = frame.get("type")
                if kind == "events":
                    events = frame["events"]
                elif "seq" in frame:
                    events = (frame,)
                else:
                    continue
                decoded += len(events)
                if keep_latencies:
                    for event in events:
                        latencies.append(received - event["ts"])
        self.recorded_bytes = 0
        return {
            "latencies": latencies.tobytes(),
            "decoded_events": decoded,
            "violations": [c.violation for c in self.connections if c.violation][:5],
            "violating_streams": sum(1 for c in self.connections if c.violation),
        }

    def close(self) -> dict[str, Any]:
        """Close every connection (a close frame first), then finish each stream's check."""
        for conn in self.connections:
            if conn.state == "open" and conn.framing != "lines":
                self._send(conn, wire.close_frame(1000))
            had_error = conn.error
            self._fail(conn, "closed")
            conn.error = had_error
        checked = counted = checked_events = not_completed = 0
        for conn in self.connections:
            counted += conn.events
            if conn.unrecorded or conn.violation or conn.error:
                continue
            try:
                report = conn.checker.finish()
            except LifecycleViolation as exc:
                conn.violation = f"{exc.rule}: {exc}"[:300]
                continue
            if report.events != conn.events:
                conn.violation = f"count: checker saw {report.events}, counted {conn.events}"
                continue
            checked += 1
            checked_events += report.events
            not_completed += sum(
                1 for run in report.runs.values() if run.terminal != "agent_completed"
            )
        result = {
            "streams": len(self.connections),
            "checked_streams": checked,
            "unchecked_streams": sum(1 for c in self.connections if c.unrecorded),
            "checked_events": checked_events,
            "counted_events": counted,
            "runs_not_completed": not_completed,
            "violations": [c.violation for c in self.connections if c.violation][:5],
            "violating_streams": sum(1 for c in self.connections if c.violation),
            "failed": sum(1 for c in self.connections if c.error),
            "errors": [c.error for c in self.connections if c.error][:5],
        }
        self.connections = []
        self.by_fd = {}
        self.index = {}
        self.opening = 0
        self.in_flight = {}
        return result


def worker_main(pipe: mp.connection.Connection) -> None:
    """Entry point of a client worker process."""
    try:
        Worker(pipe).serve()
    except KeyboardInterrupt:
        pass
    except BaseException:
        with contextlib.suppress(OSError):
            pipe.send(("error", traceback.format_exc()))


#: The counters the workers' ``ran`` / ``closed`` replies carry; the pool sums them.
_RAN_COUNTS = (
    *("events", "frames", "runs_sent", "runs_done", "incomplete"),
    *("skipped_sends", "failed", "error_frames"),
)
_CLOSED_COUNTS = (
    *("streams", "checked_streams", "unchecked_streams", "checked_events", "counted_events"),
    *("runs_not_completed", "violating_streams", "failed"),
)


class ClientPool:
    """The client worker processes (spawned once, reused by every scenario)."""

    def __init__(self, procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[mp.connection.Connection] = []
        self.processes: list[Any] = []
        for _ in range(procs):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
        self.active: list[int] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _ask(
        self, workers: list[int], messages: list[Any], reply: str, timeout: float
    ) -> list[Any]:
        for w, message in zip(workers, messages, strict=True):
            self.pipes[w].send(message)
        answers = []
        deadline = time.monotonic() + timeout
        for w in workers:
            if not self.pipes[w].poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"client worker {w} did not answer {reply!r} in {timeout:g} s")
            kind, body = self.pipes[w].recv()
            if kind != reply:
                raise RuntimeError(f"client worker {w} failed:\n{body}")
            answers.append(body)
        return answers

    def open(
        self,
        host: str,
        port: int,
        framing: str,
        targets: list[str],
        spec: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Spread ``targets`` round-robin over the workers and open them all (each
        connection within ``spec["connect_timeout"]`` seconds, default 60)."""
        # A server may take milliseconds per new session: allow for 10,000 of them.
        timeout = timeout or 300.0 + 0.05 * len(targets)
        n = len(self.pipes)
        per_worker = [[(i, t) for i, t in enumerate(targets) if i % n == w] for w in range(n)]
        self.active = [w for w in range(n) if per_worker[w]]
        answers = self._ask(
            self.active,
            [("open", host, port, framing, per_worker[w], spec or {}) for w in self.active],
            "opened",
            timeout,
        )
        return {
            "connections": sum(a["connections"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "errors": [e for a in answers for e in a["errors"]][:5],
            "open_s": max(a["open_s"] for a in answers),
            "connect_p99_s": max((a["connect_p99_s"] or 0.0) for a in answers),
        }

    def run(self, action: dict[str, Any]) -> dict[str, Any]:
        answers = self._ask(
            self.active, [("run", action)] * len(self.active), "ran", action["timeout"] + 60
        )
        total: dict[str, Any] = {
            "t_start": min(a["t_start"] for a in answers),
            "t_end": max(a["t_end"] for a in answers),
            "timed_out": any(a["timed_out"] for a in answers),
            "errors": [e for a in answers for e in a["errors"]][:5],
        }
        for key in _RAN_COUNTS:
            total[key] = sum(a[key] for a in answers)
        return total

    def analyse(self, keep_latencies: bool = True, timeout: float = 600.0) -> dict[str, Any]:
        answers = self._ask(
            self.active, [("analyse", keep_latencies)] * len(self.active), "analysed", timeout
        )
        latencies = array("d")
        for a in answers:
            latencies.frombytes(a["latencies"])
        return {
            "latencies": latencies,
            "decoded_events": sum(a["decoded_events"] for a in answers),
            "violations": [v for a in answers for v in a["violations"]][:5],
            "violating_streams": sum(a["violating_streams"] for a in answers),
        }

    def close(self, timeout: float = 120.0) -> dict[str, Any]:
        answers = self._ask(self.active, [("close",)] * len(self.active), "closed", timeout)
        self.active = []
        total: dict[str, Any] = {
            "violations": [v for a in answers for v in a["violations"]][:5],
            "errors": [e for a in answers for e in a["errors"]][:5],
        }
        for key in _CLOSED_COUNTS:
            total[key] = sum(a[key] for a in answers)
        return total

    def shutdown(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
