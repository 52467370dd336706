"""The scenarios, the server configurations they compare, and the quick / full profiles.

Each scenario starts a fresh server process per configuration, opens its
connections (not measured), then measures a window: server CPU and RSS from
/proc, client CPU, delivered events counted at the clients. After the window
every recorded frame is decoded and every stream is checked with
``netra_actors.testing.LifecycleChecker``; a row whose streams lost, reordered
or failed anything is marked incomplete and fails the run.

Scenarios (rows carry ``scenario``):

- ``throughput``: S sessions, one connection each; each connection sends
  ``stream M`` then the calculator question (a tool pair), each once the
  previous run ended, in rounds until the window is long enough. M is chosen
  so every S moves about the same number of events. Server CPU per delivered
  event is the main figure.
- ``latency``: S sessions, each sending ``stream K`` on a fixed schedule (open
  loop, spread evenly), so the offered load is fixed; latency is from an
  event's ``ts`` to the client's receipt.
- ``runs``: short runs (start, a tool pair, completion) back to back on S
  connections; runs per second.
- ``memory``: server RSS per idle session with one connection.
- ``soak``: many runs in phases (netra, small replay windows); RSS growth.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import wire
from .client import ClientPool
from .servers import HOST, ServerProcess, cpu_window, saturated, snapshot, target

#: Seconds a reader waits after a short read in throughput windows, so a client takes many
#: frames per read and stays cheap (latency windows read at once).
THROUGHPUT_READ_PAUSE = 0.005


@dataclass(frozen=True)
class ServerConfig:
    """One row kind: what serves, with which settings."""

    name: str
    kind: str  # netra, trio-ws, asyncio-peer, trio-tcp
    role: str  # netra, transport limit, asyncio peer, framing-free ceiling
    store: str = "sqlite"
    batch: int = 1
    extra: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        what = {
            "netra": f"netra ({self.store})",
            "trio-ws": "bare trio-websocket",
            "asyncio-peer": "asyncio + websockets peer",
            "trio-tcp": "plain trio TCP",
        }[self.kind]
        return what + (f", batch={self.batch}" if self.batch > 1 else "")

    def server(self, workdir: Path) -> ServerProcess:
        return ServerProcess(self.kind, workdir, store=self.store, extra=self.extra)


def configs(batch: int) -> dict[str, ServerConfig]:
    """Every configuration, keyed by name; ``batch`` is N for the multi-event rows."""
    b = f"b{batch}"
    return {
        c.name: c
        for c in (
            ServerConfig("netra-sqlite", "netra", "netra", "sqlite"),
            ServerConfig(f"netra-sqlite-{b}", "netra", "netra", "sqlite", batch),
            ServerConfig("netra-memory", "netra", "netra", "memory"),
            ServerConfig(f"netra-memory-{b}", "netra", "netra", "memory", batch),
            ServerConfig("trio-ws", "trio-ws", "transport limit"),
            ServerConfig(f"trio-ws-{b}", "trio-ws", "transport limit", batch=batch),
            ServerConfig("asyncio-peer", "asyncio-peer", "asyncio peer"),
            ServerConfig("trio-tcp", "trio-tcp", "framing-free ceiling"),
            ServerConfig(f"trio-tcp-{b}", "trio-tcp", "framing-free ceiling", batch=batch),
        )
    }


@dataclass(frozen=True)
class Profile:
    name: str
    procs: int = 2
    batch: int = 100
    repeat: int = 1
    # throughput and scaling: each session runs "stream M" then the calculator question;
    # M = max(throughput_min_stream, throughput_events / S), in rounds until min_s. The
    # floor keeps the large S points about streaming (what this scenario measures) rather
    # than about starting runs, which the short-runs scenario measures on its own.
    throughput_sessions: tuple[int, ...] = (1, 100)
    throughput_events: int = 10_000
    throughput_min_stream: int = 10
    throughput_min_s: float = 1.5
    throughput_configs: tuple[str, ...] = ()
    # and these sizes for some configurations only (the quick profile's S=1,000)
    throughput_large_sessions: tuple[int, ...] = ()
    throughput_large_configs: tuple[str, ...] = ()
    # latency at fixed offered loads: runs of at least latency_run_events events
    latency_sessions: tuple[int, ...] = (1000,)
    latency_loads: tuple[int, ...] = (1_000, 5_000, 10_000)
    latency_run_events: int = 20
    latency_warmup_s: float = 1.0
    latency_duration_s: float = 3.0
    latency_configs: tuple[str, ...] = ()
    # short runs
    runs_sessions: int = 100
    runs_per_session: int = 5
    runs_configs: tuple[str, ...] = ()
    # memory
    memory_sessions: tuple[int, ...] = (1000,)
    memory_configs: tuple[str, ...] = ()
    soak_sessions: int = 10
    soak_warm_runs: int = 80  # per session: fills the windows and the 200-message histories
    soak_phases: int = 2
    soak_runs_per_phase: int = 40  # per session
    soak_window_events: int = 100
    settle_s: float = 1.0  # pauses before memory readings
    scenarios: tuple[str, ...] = ("throughput", "latency", "runs", "memory", "soak")


_ALL = (
    "netra-sqlite",
    "netra-sqlite-b100",
    "netra-memory",
    "netra-memory-b100",
    "trio-ws",
    "trio-ws-b100",
    "asyncio-peer",
    "trio-tcp",
    "trio-tcp-b100",
)
_PEERS = ("netra-sqlite", "netra-sqlite-b100", "trio-ws", "asyncio-peer")

PROFILES = {
    # make bench: under 5 minutes on 2 shared cores. S = 1 and 100 for every configuration,
    # 1,000 where the targets are; latency at 100 and 1,000 sessions, memory at 1,000.
    "quick": Profile(
        "quick",
        # The full profile's runs (M = 50,000 / S): at S = 100, 500-event runs as in
        # bench-full, not 60-event ones that mostly measure starting runs.
        throughput_events=50_000,
        throughput_min_stream=50,
        throughput_min_s=1.0,
        throughput_configs=(*_PEERS, "netra-memory", "trio-ws-b100", "trio-tcp"),
        throughput_large_sessions=(1000,),
        throughput_large_configs=(*_PEERS, "trio-ws-b100"),
        latency_sessions=(100, 1000),
        latency_warmup_s=0.5,
        latency_duration_s=2.5,
        latency_configs=("netra-sqlite", "trio-ws", "asyncio-peer"),
        runs_configs=("netra-sqlite", "netra-memory", "trio-ws", "asyncio-peer"),
        memory_configs=("netra-sqlite", "trio-ws", "asyncio-peer"),
        soak_warm_runs=70,
        soak_runs_per_phase=30,
        settle_s=0.5,
    ),
    # make bench-full: every figure of issue 7, up to 10,000 sessions, repeated.
    "full": Profile(
        "full",
        repeat=2,
        throughput_sessions=(1, 10, 100, 1000),
        throughput_events=50_000,
        throughput_min_stream=50,
        throughput_min_s=4.0,
        throughput_configs=_ALL,
        # One round at 10,000 sessions is 620,000 events (3-5 minutes a point here):
        # the configurations the targets compare only.
        throughput_large_sessions=(10_000,),
        throughput_large_configs=_PEERS,
        latency_sessions=(1, 100, 1000),
        latency_loads=(1_000, 5_000, 10_000, 20_000),
        latency_warmup_s=2.0,
        latency_duration_s=8.0,
        latency_configs=(*_PEERS, "netra-memory"),
        runs_sessions=100,
        runs_per_session=20,
        runs_configs=("netra-sqlite", "netra-memory", "trio-ws", "asyncio-peer"),
        memory_sessions=(1000, 10_000),
        memory_configs=("netra-sqlite", "netra-memory", "trio-ws", "asyncio-peer"),
        soak_sessions=50,
        soak_phases=5,
        soak_runs_per_phase=60,
    ),
    # The smoke test: every server kind once, tiny.
    "tiny": Profile(
        "tiny",
        throughput_sessions=(2,),
        throughput_events=100,
        throughput_min_s=0.0,
        throughput_configs=(
            "netra-sqlite",
            "netra-memory-b100",
            "trio-ws-b100",
            "asyncio-peer",
            "trio-tcp",
        ),
        latency_sessions=(2,),
        latency_loads=(100,),
        latency_run_events=5,
        latency_warmup_s=0.2,
        latency_duration_s=0.6,
        latency_configs=("netra-sqlite",),
        runs_sessions=2,
        runs_per_session=3,
        runs_configs=("netra-sqlite",),
        memory_sessions=(10,),
        memory_configs=("netra-sqlite",),
        soak_sessions=2,
        soak_warm_runs=2,
        soak_phases=2,
        soak_runs_per_phase=2,
        settle_s=0.2,
    ),
}


def _f1(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def only_configs(profile: Profile, names: set[str]) -> Profile:
    """``profile`` with every scenario's configurations cut down to ``names``."""
    names_of = [f.name for f in fields(profile) if f.name.endswith("_configs")]
    return replace(
        profile, **{f: tuple(c for c in getattr(profile, f) if c in names) for f in names_of}
    )


def expected_events(text: str) -> int:
    """Events of one demo run for ``text`` (netra's demo agent and the baselines agree)."""
    return sum(1 for _ in wire.demo_events(text, "u"))


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, ``q`` in 0..100; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * q / 100)) - 1]


def latency_summary(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50 / p99 / max in milliseconds."""
    ms = [x * 1000 for x in latencies]
    return {
        "lat_p50_ms": pct(ms, 50),
        "lat_p99_ms": pct(ms, 99),
        "lat_max_ms": max(ms) if ms else None,
        "lat_n": len(ms),
    }


@dataclass
class Bench:
    """Runs scenarios against fresh servers with one pool of client processes."""

    profile: Profile
    workdir: Path
    log: Callable[[str], None] = print
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pool: ClientPool | None = None

    def __post_init__(self) -> None:
        self.configs = configs(self.profile.batch)

    # --- plumbing --------------------------------------------------------------------------

    def _pool(self) -> ClientPool:
        if self.pool is None:
            self.pool = ClientPool(self.profile.procs)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _config(self, name: str) -> ServerConfig:
        if name in self.configs:
            return self.configs[name]
        # Another batch size than the profile's: "netra-sqlite-b10" and the like.
        base, _, n = name.rpartition("-b")
        if base in self.configs and n.isdigit():
            return replace(self.configs[base], name=name, batch=int(n))
        raise KeyError(f"unknown configuration {name!r}; known: {sorted(self.configs)}")

    def _serve(self, cfg: ServerConfig, tag: str, extra: tuple[str, ...] = ()) -> ServerProcess:
        workdir = self.workdir / f"{tag}-{cfg.name}-{uuid.uuid4().hex[:6]}"
        server = replace(cfg, extra=cfg.extra + extra).server(workdir)
        return server.start()

    def _targets(self, tag: str, sessions: int, batch: int) -> list[str]:
        run = uuid.uuid4().hex[:6]
        return [target(f"{tag}-{run}-{i}", batch) for i in range(sessions)]

    def _open(self, server: ServerProcess, targets: list[str]) -> dict[str, Any]:
        opened = self._pool().open(HOST, server.port, server.framing, targets)
        if opened["failed"]:
            raise RuntimeError(f"{opened['failed']} connection(s) failed: {opened['errors']}")
        return opened

    def _finish(self, row: dict[str, Any], closed: dict[str, Any], analysed: list[Any]) -> None:
        """Fold the checks into ``row`` and note a failure if anything was lost."""
        row["streams"] = closed["streams"]
        row["checked_streams"] = closed["checked_streams"]
        row["checked_events"] = closed["checked_events"]
        row["violations"] = closed["violations"] + [v for a in analysed for v in a["violations"]]
        row["runs_not_completed"] = closed["runs_not_completed"]
        problems = []
        if closed["violating_streams"] or row["violations"]:
            problems.append(f"lifecycle violations: {row['violations'][:2]}")
        if closed["failed"]:
            problems.append(f"{closed['failed']} connection(s) failed: {closed['errors'][:2]}")
        if closed["checked_streams"] != closed["streams"]:
            problems.append(f"{closed['streams'] - closed['checked_streams']} stream(s) unchecked")
        if closed["checked_events"] != closed["counted_events"]:
            problems.append(
                f"checked {closed['checked_events']} of {closed['counted_events']} events"
            )
        if closed["runs_not_completed"]:
            problems.append(f"{closed['runs_not_completed']} run(s) not agent_completed")
        if row.get("expected_events") is not None and row["events"] != row["expected_events"]:
            problems.append(f"delivered {row['events']} of {row['expected_events']} events")
        if row.get("timed_out"):
            problems.append("timed out")
        row["complete"] = not problems
        if problems:
            row["problems"] = problems
            self.failures.append(
                f"{row['scenario']} {row['config']} S={row.get('sessions')}: " + "; ".join(problems)
            )

    def _row(self, scenario: str, cfg: ServerConfig, **fields: Any) -> dict[str, Any]:
        row = {
            "scenario": scenario,
            "config": cfg.name,
            "label": cfg.label,
            "kind": cfg.kind,
            "role": cfg.role,
            "store": cfg.store if cfg.kind == "netra" else None,
            "batch": cfg.batch,
            **fields,
        }
        self.rows.append(row)
        return row

    def _guarded(self, what: str, fn: Callable[[], None]) -> None:
        """Run one point; a crash fails the run but not the points after it."""
        try:
            fn()
        except Exception as exc:
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}"[:500])
            self.log(f"  FAILED {what}: {type(exc).__name__}: {exc}"[:500])
            self.close()  # a fresh pool for what follows

    # --- throughput and scaling ----------------------------------------------------------

    def throughput(self) -> None:
        """One server per configuration; its points in increasing S, fresh users each."""
        for name in self.profile.throughput_configs:
            cfg = self._config(name)
            self._guarded(f"throughput {name}", lambda cfg=cfg: self._throughput_config(cfg))

    def _throughput_config(self, cfg: ServerConfig) -> None:
        server = self._serve(cfg, "tp")
        try:
            sessions_list = self.profile.throughput_sessions
            if cfg.name in self.profile.throughput_large_configs:
                sessions_list += self.profile.throughput_large_sessions
            for sessions in sessions_list:
                for rep in range(self.profile.repeat):
                    self._throughput(cfg, server, sessions, rep)
        finally:
            server.stop()

    def _throughput(
        self, cfg: ServerConfig, server: ServerProcess, sessions: int, rep: int
    ) -> None:
        p = self.profile
        per_session = max(p.throughput_min_stream, p.throughput_events // sessions)
        texts = [f"stream {per_session}", wire.CALC_TEXT]
        per_round = sessions * sum(expected_events(t) for t in texts)
        pool = self._pool()
        rss0 = server.rss_kib()
        opened = self._open(server, self._targets("tp", sessions, cfg.batch))
        time.sleep(0.2)
        action = {
            "action": "messages",
            "texts": texts,
            "timeout": 900.0,
            "read_pause": THROUGHPUT_READ_PAUSE,
        }
        s0 = snapshot(server.pid, pool.pids)
        events = frames = rounds = 0
        first = last = None
        timed_out = False
        while True:
            ran = pool.run(action)
            rounds += 1
            events += ran["events"]
            frames += ran["frames"]
            first = first or ran
            last = ran
            timed_out = timed_out or ran["timed_out"] or bool(ran["failed"])
            if timed_out or ran["t_end"] - first["t_start"] >= p.throughput_min_s:
                break
        s1 = snapshot(server.pid, pool.pids)
        wall = max(last["t_end"] - first["t_start"], 1e-9)
        rss1 = server.rss_kib()
        analysed = pool.analyse(keep_latencies=True)
        closed = pool.close()
        window = cpu_window(s0, s1, wall)
        row = self._row(
            "throughput",
            cfg,
            sessions=sessions,
            repeat=rep,
            events_per_run=per_session,
            rounds=rounds,
            events=events,
            expected_events=per_round * rounds,
            frames=frames,
            events_per_frame=events / frames if frames else None,
            events_per_s=events / wall,
            server_us_per_event=window["server_cpu_s"] / events * 1e6 if events else None,
            clients_us_per_event=window["clients_cpu_s"] / events * 1e6 if events else None,
            saturated=saturated(window),
            timed_out=timed_out,
            rss_before_kib=rss0,
            rss_after_kib=rss1,
            open_s=opened["open_s"],
            **window,
            **latency_summary(analysed["latencies"]),
        )
        self._finish(row, closed, [analysed])
        self.log(
            f"  throughput {cfg.name:<20} S={sessions:<6} {row['events_per_s']:>8.0f} ev/s "
            f"{_f1(row['server_us_per_event'])} us/ev server (CPU {row['server_util']:.0%}, "
            f"waited {row['server_wait_frac']:.0%}; clients {_f1(row['clients_us_per_event'])}"
            f" us/ev), saturated: {row['saturated']}{'' if row['complete'] else ' INCOMPLETE'}"
        )

    # --- latency at fixed offered loads -----------------------------------------------------

    def latency(self) -> None:
        for name in self.profile.latency_configs:
            cfg = self._config(name)
            self._guarded(f"latency {name}", lambda cfg=cfg: self._latency_config(cfg))

    def _latency_config(self, cfg: ServerConfig) -> None:
        server = self._serve(cfg, "lat")
        try:
            for sessions in self.profile.latency_sessions:
                self._latency(cfg, server, sessions)
        finally:
            server.stop()

    def _latency(self, cfg: ServerConfig, server: ServerProcess, sessions: int) -> None:
        """Each load in turn on the same connections; a load the server could not carry
        (fewer events delivered than offered, or sends skipped because the session's
        previous run had not ended) ends the series: higher loads are not tried."""
        p = self.profile
        pool = self._pool()
        points: list[dict[str, Any]] = []
        analysed_all = []
        skipped: list[int] = []
        self._open(server, self._targets("lat", sessions, cfg.batch))
        time.sleep(0.2)
        phases = [(p.latency_loads[0], p.latency_warmup_s, True)]
        phases += [(load, p.latency_duration_s, False) for load in p.latency_loads]
        for index, (load, duration, warmup) in enumerate(phases):
            per_session = load / sessions
            # At most 10 runs a second per session: faster sessions get longer runs.
            per_run = max(p.latency_run_events, math.ceil(per_session / 10))
            interval = per_run / per_session
            action = {
                "action": "paced",
                "text": f"stream {per_run - 3}",
                "interval": interval,
                "duration": duration,
                "offsets": [interval * i / sessions for i in range(sessions)],
                "max_outstanding": 1,
                "lead": 0.2,
                "timeout": duration + 300.0,
            }
            s0 = snapshot(server.pid, pool.pids)
            ran = pool.run(action)
            s1 = snapshot(server.pid, pool.pids)
            analysed = pool.analyse(keep_latencies=True)
            analysed_all.append(analysed)
            if warmup:
                continue
            wall = max(ran["t_end"] - ran["t_start"] - 0.2, 1e-9)
            window = cpu_window(s0, s1, wall)
            overloaded = ran["skipped_sends"] > 0 or ran["events"] / wall < 0.9 * load
            points.append(
                {
                    "sessions": sessions,
                    "offered_events_per_s": load,
                    "events_per_run": per_run,
                    "runs_per_s": sessions / interval,
                    "events": ran["events"],
                    "events_per_s": ran["events"] / wall,
                    "expected_events": ran["runs_sent"] * per_run,
                    "frames": ran["frames"],
                    "skipped_sends": ran["skipped_sends"],
                    "overloaded": overloaded,
                    "timed_out": ran["timed_out"] or bool(ran["failed"]),
                    "server_us_per_event": (
                        window["server_cpu_s"] / ran["events"] * 1e6 if ran["events"] else None
                    ),
                    "saturated": saturated(window),
                    **window,
                    **latency_summary(analysed["latencies"]),
                }
            )
            if overloaded:
                skipped = [load for load, _, _ in phases[index + 1 :]]
                break
        closed = pool.close()
        for point in points:
            row = self._row("latency", cfg, **point)
            self._finish(row, closed, analysed_all)
            self.log(
                f"  latency    {cfg.name:<20} S={sessions:<6} offered "
                f"{point['offered_events_per_s']:>6} got {row['events_per_s']:>7.0f} ev/s  "
                f"p50 {_f1(row['lat_p50_ms'])} ms  p99 {_f1(row['lat_p99_ms'])} ms  max "
                f"{_f1(row['lat_max_ms'])} ms  server CPU {row['server_util']:.0%}"
                f"{' OVERLOADED' if row['overloaded'] else ''}"
                f"{'' if row['complete'] else ' INCOMPLETE'}"
            )
        if skipped and points:
            self.rows[-1]["higher_loads_not_run"] = skipped
            self.log(f"  latency    {cfg.name:<20} S={sessions:<6} not run (overloaded): {skipped}")

    # --- short runs -------------------------------------------------------------------------

    def runs(self) -> None:
        for name in self.profile.runs_configs:
            cfg = self._config(name)
            self._guarded(f"runs {name}", lambda cfg=cfg: self._runs(cfg))

    def _runs(self, cfg: ServerConfig) -> None:
        p = self.profile
        pool = self._pool()
        server = self._serve(cfg, "runs")
        texts = [wire.CALC_TEXT] * p.runs_per_session
        try:
            self._open(server, self._targets("runs", p.runs_sessions, cfg.batch))
            time.sleep(0.3)
            s0 = snapshot(server.pid, pool.pids)
            ran = pool.run({"action": "messages", "texts": texts, "timeout": 600.0})
            s1 = snapshot(server.pid, pool.pids)
            analysed = pool.analyse(keep_latencies=False)
            closed = pool.close()
        finally:
            server.stop()
        wall = max(ran["t_end"] - ran["t_start"], 1e-9)
        window = cpu_window(s0, s1, wall)
        runs = ran["runs_done"]
        row = self._row(
            "runs",
            cfg,
            sessions=p.runs_sessions,
            runs=runs,
            runs_per_s=runs / wall,
            events=ran["events"],
            expected_events=p.runs_sessions * p.runs_per_session * expected_events(texts[0]),
            server_us_per_run=window["server_cpu_s"] / runs * 1e6 if runs else None,
            saturated=saturated(window),
            timed_out=ran["timed_out"] or bool(ran["failed"]),
            **window,
        )
        self._finish(row, closed, [analysed])
        self.log(
            f"  runs       {cfg.name:<20} S={p.runs_sessions:<6} {row['runs_per_s']:>7.0f} runs/s "
            f"{(row['server_us_per_run'] or 0) / 1000:6.2f} ms CPU/run, saturated: "
            f"{row['saturated']}{'' if row['complete'] else ' INCOMPLETE'}"
        )

    # --- memory -------------------------------------------------------------------------------

    def memory(self) -> None:
        p = self.profile
        for name in p.memory_configs:
            cfg = self._config(name)
            for sessions in p.memory_sessions:
                self._guarded(
                    f"memory {name} S={sessions}",
                    lambda cfg=cfg, s=sessions: self._memory(cfg, s),
                )

    def _memory(self, cfg: ServerConfig, sessions: int) -> None:
        pool = self._pool()
        settle = self.profile.settle_s
        server = self._serve(cfg, "mem")
        try:
            time.sleep(settle)
            rss0 = server.rss_kib()
            opened = self._open(server, self._targets("mem", sessions, cfg.batch))
            time.sleep(2 * settle)
            rss1 = server.rss_kib()
            closed = pool.close()
            time.sleep(settle)
            rss2 = server.rss_kib()
        finally:
            server.stop()
        row = self._row(
            "memory",
            cfg,
            sessions=sessions,
            events=0,
            rss_before_kib=rss0,
            rss_open_kib=rss1,
            rss_after_close_kib=rss2,
            kib_per_session=(rss1 - rss0) / sessions,
            open_s=opened["open_s"],
            connect_p99_s=opened["connect_p99_s"],
        )
        self._finish(row, closed, [])
        self.log(
            f"  memory     {cfg.name:<20} S={sessions:<6} "
            f"{row['kib_per_session']:6.1f} KiB/session "
            f"(RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB, {rss2 / 1024:.0f} after close), "
            f"opened in {opened['open_s']:.1f} s"
        )

    def soak(self) -> None:
        self._guarded("soak", self._soak)

    def _soak(self) -> None:
        """Runs on a few sessions: a warm-up long enough to fill everything bounded (replay
        windows of ``soak_window_events``, thread histories of 200 messages), then phases
        of more runs; the RSS growth after the warm-up, per 1,000 runs, is the leak figure."""
        p = self.profile
        cfg = self._config("netra-sqlite")
        pool = self._pool()
        extra = ("--window-events", str(p.soak_window_events))
        server = self._serve(cfg, "soak", extra)
        pair = [wire.CALC_TEXT, "stream 20"]
        phases = [pair * (p.soak_warm_runs // 2 or 1)]
        phases += [pair * (p.soak_runs_per_phase // 2 or 1)] * p.soak_phases
        rss: list[int] = []
        events = expected = 0
        analysed = []
        timed_out = False
        try:
            self._open(server, self._targets("soak", p.soak_sessions, 1))
            time.sleep(0.3)
            rss.append(server.rss_kib())
            for texts in phases:
                ran = pool.run({"action": "messages", "texts": texts, "timeout": 900.0})
                events += ran["events"]
                expected += p.soak_sessions * sum(expected_events(t) for t in texts)
                timed_out = timed_out or ran["timed_out"] or bool(ran["failed"])
                analysed.append(pool.analyse(keep_latencies=False))
                time.sleep(p.settle_s / 2)
                rss.append(server.rss_kib())
            closed = pool.close()
        finally:
            server.stop()
        later = p.soak_sessions * sum(len(texts) for texts in phases[1:])
        row = self._row(
            "soak",
            replace(cfg, name=f"netra-sqlite (window {p.soak_window_events})"),
            sessions=p.soak_sessions,
            runs=p.soak_sessions * sum(len(texts) for texts in phases),
            warm_runs=p.soak_sessions * len(phases[0]),
            events=events,
            expected_events=expected,
            rss_phases_kib=rss,
            timed_out=timed_out,
            growth_kib_per_1000_runs=(rss[-1] - rss[1]) / later * 1000 if later else None,
        )
        self._finish(row, closed, analysed)
        self.log(
            f"  soak       {row['runs']} runs, RSS (MiB) before / after the warm-up / after each "
            f"phase: {[round(r / 1024, 1) for r in rss]}; growth after the warm-up "
            f"{_f1(row['growth_kib_per_1000_runs'])} KiB per 1000 runs"
        )

    def run(self, only: Sequence[str] | None = None) -> None:
        for scenario in only or self.profile.scenarios:
            self.log(f"--- {scenario}")
            getattr(self, scenario)()


def parse_only(value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [v for v in re.split(r"[,\s]+", value) if v]
    unknown = set(names) - set(Profile("x").scenarios)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}")
    return names
