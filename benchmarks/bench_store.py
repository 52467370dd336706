"""What persistence costs: the same workloads with no store, SQLite NORMAL and SQLite FULL.

Every measurement runs in this process, through the in-process API
(``Runtime.start_run`` and ``RunHandle.events()``), with a fresh data folder in a
temporary directory, and the three stores are interleaved in each repeat (their
order rotates from one repeat to the next), so drift on a shared machine falls
on all of them alike:

- ``memory``: ``Config(store="memory")``, nothing persisted (the baseline);
- ``sqlite NORMAL``: the default, WAL with ``synchronous=NORMAL`` (a committed
  event survives a process crash);
- ``sqlite FULL``: WAL with ``synchronous=FULL`` (an fsync per commit: it also
  survives a power loss).

Workloads:

(a) one user, one run ``stream N`` (N ``partial_result`` events): events/s
    (wall clock) and us per event (wall clock and process CPU, the SQLite writer
    thread included);
(b) many users (``--users``) each running ``stream M`` at the same time:
    events/s, us of CPU per event, and the group-commit figures of the store
    (``writes/commits``: store writes carried per transaction, and events per
    transaction);
(c) per-run latency: one user runs ``what is 2+3*4?`` (10 events, one tool call)
    ``--runs`` times in a row, timed from ``start_run`` to the terminal event
    (after one untimed run that creates the user's session): p50 and p95.

Also reported: ``events/batch``, the events the session's sequencer published
per batch (with a store, one ``append`` and one commit wait per batch: a store
that takes time lets the batches grow, which is why persistence costs little
throughput), and ``commit p50``, the time a transaction takes in the writer's
thread (BEGIN to COMMIT, the fsync included).

For the SQLite stores the database size per event is measured after the run:
the file is checkpointed (``wal_checkpoint(TRUNCATE)``) and sized as
``page_count * page_size``, divided by the events stored (which must equal the
events delivered). Every stream delivered is checked with the public lifecycle
checker, outside the timed region. Figures: median of ``--repeat`` runs, with
the spread (min-max) in brackets.

Usage: ``python benchmarks/bench_store.py [--quick] [--repeat R] [--dir PATH]``.
``--dir`` picks the filesystem the databases go on (the fsync cost depends on it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from netra_actors import Config, Runtime
from netra_actors._messages import Event
from netra_actors._store import DB_FILENAME, SqliteStore
from netra_actors.testing import check_lifecycle

#: (label, Config.store, Config.sqlite_synchronous)
STORES: tuple[tuple[str, str, str], ...] = (
    ("memory", "memory", "NORMAL"),
    ("sqlite NORMAL", "sqlite", "NORMAL"),
    ("sqlite FULL", "sqlite", "FULL"),
)
SHORT_RUN = "what is 2+3*4?"
#: A workload: every stream it received (one per user) and its per-run latencies.
Workload = Callable[[Runtime], Awaitable[tuple[list[list[str]], list[float]]]]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@attrs.frozen
class Measurement:
    """One workload under one store, once."""

    store: str
    events: int
    wall: float
    cpu: float
    #: The sequencer's publish batches (with a store: one ``append`` each).
    batches: int = 0
    #: The store's transactions and the writes they carried (None without a store).
    commits: int | None = None
    writes: int | None = None
    #: ``page_count * page_size`` after a checkpoint, and the events the file holds.
    db_bytes: int | None = None
    stored_events: int | None = None
    #: Seconds from ``start_run`` to the terminal event, per run (workload c).
    latencies: tuple[float, ...] = ()
    #: Seconds each store transaction took in the writer's thread.
    commit_times: tuple[float, ...] = ()
    #: Every stream delivered (one list of frames per user), for the lifecycle checker.
    streams: tuple[tuple[str, ...], ...] = ()

    @property
    def wall_us(self) -> float:
        return self.wall / self.events * 1e6

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.events * 1e6

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall

    @property
    def events_per_batch(self) -> float:
        return self.events / self.batches if self.batches else 0.0

    @property
    def bytes_per_event(self) -> float | None:
        if self.db_bytes is None or not self.stored_events:
            return None
        return self.db_bytes / self.stored_events

    @property
    def frame_bytes(self) -> float:
        """The mean size of a delivered frame (UTF-8 JSON), to compare with the file's."""
        sizes = [len(frame.encode()) for stream in self.streams for frame in stream]
        return statistics.fmean(sizes) if sizes else 0.0

    @property
    def writes_per_commit(self) -> float | None:
        return self.writes / self.commits if self.commits and self.writes is not None else None

    @property
    def events_per_commit(self) -> float | None:
        return self.events / self.commits if self.commits else None


@attrs.frozen
class Results:
    """Every measurement of every workload, in the order taken."""

    single: tuple[Measurement, ...]
    many: tuple[Measurement, ...]
    latency: tuple[Measurement, ...]
    sizes: dict[str, int]

    def all(self) -> tuple[Measurement, ...]:
        return self.single + self.many + self.latency


def db_size(data_dir: Path) -> tuple[int, int]:
    """(``page_count * page_size`` after a full checkpoint, events stored)."""
    with contextlib.closing(sqlite3.connect(data_dir / DB_FILENAME)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (events,) = db.execute("SELECT count(*) FROM events").fetchone()
    return pages * page_size, events


def _config(store: str, synchronous: str, data_dir: Path) -> Config:
    return Config(store=store, sqlite_synchronous=synchronous, data_dir=data_dir)


async def _measure(
    label: str,
    store: str,
    synchronous: str,
    data_dir: Path,
    workload: Workload,
) -> Measurement:
    gc.collect()
    async with Runtime(_config(store, synchronous, data_dir)) as runtime:
        if store == "sqlite":
            # The store of a "memory" runtime is None; a "sqlite" one is a SqliteStore.
            assert isinstance(runtime.store, SqliteStore)
        else:
            assert runtime.store is None
        # Count the sequencer's publish batches (one store write each, with a store): wrap
        # the tracker's observer before any session binds it.
        batches = 0
        observe = runtime.tracker.observe

        def counting(session_id: str, user_id: str, events: Sequence[Event]) -> None:
            nonlocal batches
            batches += 1
            observe(session_id, user_id, events)

        runtime.tracker.observe = counting  # type: ignore[method-assign]
        # Time each transaction in the writer's thread (BEGIN to COMMIT, fsync included).
        commit_times: list[float] = []
        if isinstance(runtime.store, SqliteStore):
            commit = runtime.store._commit

            def timed_commit(batch: list[Any]) -> None:
                start = time.perf_counter()
                commit(batch)
                commit_times.append(time.perf_counter() - start)

            runtime.store._commit = timed_commit  # type: ignore[method-assign]
        cpu0, wall0 = _cpu(), time.perf_counter()
        streams, latencies = await workload(runtime)
        wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
        sqlite_store = runtime.store if isinstance(runtime.store, SqliteStore) else None
        commits = sqlite_store.commits if sqlite_store else None
        writes = sqlite_store.writes if sqlite_store else None
    events = sum(len(s) for s in streams)
    db_bytes = stored = None
    if store == "sqlite":
        db_bytes, stored = db_size(data_dir)
    return Measurement(
        label,
        events,
        wall,
        cpu,
        batches=batches,
        commits=commits,
        writes=writes,
        db_bytes=db_bytes,
        stored_events=stored,
        latencies=tuple(latencies),
        commit_times=tuple(commit_times),
        streams=tuple(tuple(s) for s in streams),
    )


async def _collect(runtime: Runtime, user: str, text: str) -> list[str]:
    run = await runtime.start_run(user, text)
    return [event.frame async for event in run.events()]


def single_stream(events: int) -> Workload:
    """Workload (a): one user, one run of ``events`` streamed pieces."""

    async def workload(runtime: Runtime) -> tuple[list[list[str]], list[float]]:
        return [await _collect(runtime, "bench-single", f"stream {events}")], []

    return workload


def many_users(users: int, events: int) -> Workload:
    """Workload (b): ``users`` users at once, each one run of ``events`` pieces."""

    async def workload(runtime: Runtime) -> tuple[list[list[str]], list[float]]:
        streams: list[list[str]] = [[] for _ in range(users)]

        async def one(i: int) -> None:
            streams[i] = await _collect(runtime, f"bench-user-{i}", f"stream {events}")

        async with trio.open_nursery() as nursery:
            for i in range(users):
                nursery.start_soon(one, i)
        return streams, []

    return workload


def short_runs(runs: int) -> Workload:
    """Workload (c): one user, ``runs`` short runs in a row (plus one untimed first run)."""

    async def workload(runtime: Runtime) -> tuple[list[list[str]], list[float]]:
        stream = await _collect(runtime, "bench-latency", SHORT_RUN)
        latencies = []
        for _ in range(runs):
            start = time.perf_counter()
            stream += await _collect(runtime, "bench-latency", SHORT_RUN)
            latencies.append(time.perf_counter() - start)
        return [stream], latencies

    return workload


def _rotated(r: int) -> Sequence[tuple[str, str, str]]:
    k = r % len(STORES)
    return STORES[k:] + STORES[:k]


async def measure(
    *,
    events: int = 20_000,
    users: int = 100,
    user_events: int = 200,
    runs: int = 200,
    repeat: int = 3,
    root: Path | None = None,
    warmup: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Results:
    """Run the three workloads ``repeat`` times under each store; data under ``root``."""
    single: list[Measurement] = []
    many: list[Measurement] = []
    latency: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="netra-bench-store-", dir=root) as tmp:
        counter = 0
        if warmup:
            # Once per store at a small size, discarded: imports, caches, the first file.
            for label, store, synchronous in STORES:
                for workload in (single_stream(200), many_users(4, 20), short_runs(4)):
                    counter += 1
                    data_dir = Path(tmp) / f"{counter:03d}"
                    await _measure(label, store, synchronous, data_dir, workload)
        plan = (
            ("a", single_stream(events), single),
            ("b", many_users(users, user_events), many),
            ("c", short_runs(runs), latency),
        )
        for r in range(repeat):
            for name, workload, into in plan:
                for label, store, synchronous in _rotated(r):
                    counter += 1
                    data_dir = Path(tmp) / f"{counter:03d}"
                    m = await _measure(label, store, synchronous, data_dir, workload)
                    into.append(m)
                    if progress is not None:
                        progress(f"repeat {r + 1} ({name}) {label}: {m.events_per_s:,.0f} ev/s")
    return Results(
        tuple(single),
        tuple(many),
        tuple(latency),
        {"events": events, "users": users, "user_events": user_events, "runs": runs},
    )


def check(results: Results) -> int:
    """Check every delivered stream (lifecycle) and that SQLite stored all of it."""
    streams = 0
    for m in results.all():
        for stream in m.streams:
            check_lifecycle(stream, first_seq=1)
            streams += 1
        if m.stored_events is not None and m.stored_events != m.events:
            raise AssertionError(
                f"{m.store}: {m.events} events delivered, {m.stored_events} stored"
            )
    return streams


# -- the report ------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _fig(values: Sequence[float], fmt: str) -> str:
    """Median, then the spread (min-max) across repeats."""
    med = statistics.median(values)
    if len(values) < 2:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def _by_store(ms: Sequence[Measurement]) -> dict[str, list[Measurement]]:
    grouped: dict[str, list[Measurement]] = {label: [] for label, _, _ in STORES}
    for m in ms:
        grouped[m.store].append(m)
    return grouped


def _ratio(
    grouped: dict[str, list[Measurement]], label: str, key: Callable[[Measurement], float]
) -> float:
    base = statistics.median(key(m) for m in grouped["memory"])
    return statistics.median(key(m) for m in grouped[label]) / base


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


def _opt(values: Sequence[float | None], fmt: str) -> str:
    present = [v for v in values if v is not None]
    return _fig(present, fmt) if present else "-"


def report(results: Results) -> str:
    sizes = results.sizes
    out = []
    single = _by_store(results.single)
    rows = []
    for label, group in single.items():
        rows.append(
            [
                label,
                _fig([m.events_per_s for m in group], ",.0f"),
                _fig([m.wall_us for m in group], ".1f"),
                _fig([m.cpu_us for m in group], ".1f"),
                f"{_ratio(single, label, lambda m: m.wall_us):.2f}x",
                f"{_ratio(single, label, lambda m: m.cpu_us):.2f}x",
                _fig([m.events_per_batch for m in group], ".1f"),
                _opt([m.events_per_commit for m in group], ".1f"),
                _opt([m.bytes_per_event for m in group], ".0f"),
                f"{statistics.median(m.frame_bytes for m in group):.0f}",
            ]
        )
    out.append(f"(a) one user, one run 'stream {sizes['events']}'")
    out.append(
        _table(
            [
                "store",
                "events/s",
                "us/event wall",
                "us/event CPU",
                "wall vs memory",
                "CPU vs memory",
                "events/batch",
                "events/commit",
                "DB bytes/event",
                "frame bytes",
            ],
            rows,
        )
    )
    many = _by_store(results.many)
    rows = []
    for label, group in many.items():
        rows.append(
            [
                label,
                _fig([m.events_per_s for m in group], ",.0f"),
                _fig([m.cpu_us for m in group], ".1f"),
                f"{_ratio(many, label, lambda m: m.wall_us):.2f}x",
                f"{_ratio(many, label, lambda m: m.cpu_us):.2f}x",
                _fig([m.events_per_batch for m in group], ".1f"),
                _opt([m.writes_per_commit for m in group], ".1f"),
                _opt([m.events_per_commit for m in group], ".0f"),
                _opt([m.bytes_per_event for m in group], ".0f"),
                f"{statistics.median(m.frame_bytes for m in group):.0f}",
            ]
        )
    out.append("")
    out.append(f"(b) {sizes['users']} users at once, each 'stream {sizes['user_events']}'")
    out.append(
        _table(
            [
                "store",
                "events/s",
                "us/event CPU",
                "wall vs memory",
                "CPU vs memory",
                "events/batch",
                "writes/commit",
                "events/commit",
                "DB bytes/event",
                "frame bytes",
            ],
            rows,
        )
    )
    lat = _by_store(results.latency)
    rows = []
    for label, group in lat.items():

        def p50(m: Measurement) -> float:
            return _percentile(m.latencies, 50) * 1e3

        rows.append(
            [
                label,
                _fig([p50(m) for m in group], ".2f"),
                _fig([_percentile(m.latencies, 95) * 1e3 for m in group], ".2f"),
                f"{_ratio(lat, label, p50):.2f}x",
                _opt(
                    [
                        None if m.commits is None else m.commits / (len(m.latencies) + 1)
                        for m in group
                    ],
                    ".1f",
                ),
                _opt(
                    [
                        _percentile(m.commit_times, 50) * 1e3 if m.commit_times else None
                        for m in group
                    ],
                    ".2f",
                ),
            ]
        )
    out.append("")
    out.append(f"(c) latency of a short run ('{SHORT_RUN}', 10 events), {sizes['runs']} in a row")
    out.append(
        _table(["store", "p50 ms", "p95 ms", "p50 vs memory", "commits/run", "commit p50 ms"], rows)
    )
    return "\n".join(out)


def _machine(root: str) -> str:
    load = os.getloadavg()
    return (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, data in {root}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads (seconds)")
    parser.add_argument("--events", type=int, help="(a) events in the one run (default 20000)")
    parser.add_argument("--users", type=int, help="(b) users at once (default 100)")
    parser.add_argument("--user-events", type=int, help="(b) events per user (default 200)")
    parser.add_argument("--runs", type=int, help="(c) short runs timed (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per store (default 3)")
    parser.add_argument("--dir", type=Path, help="where the databases go (default: temp dir)")
    args = parser.parse_args()
    quick = {"events": 2_000, "users": 100, "user_events": 20, "runs": 50}
    full = {"events": 20_000, "users": 100, "user_events": 200, "runs": 200}
    sizes: dict[str, int] = {
        key: getattr(args, key) if getattr(args, key) is not None else value
        for key, value in (quick if args.quick else full).items()
    }
    root = str(args.dir or tempfile.gettempdir())
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {_machine(root)}")
    print(f"repeats: {args.repeat}; median (min-max)", flush=True)

    def progress(line: str) -> None:
        print("  " + line, file=sys.stderr, flush=True)

    results = trio.run(
        lambda: measure(
            events=sizes["events"],
            users=sizes["users"],
            user_events=sizes["user_events"],
            runs=sizes["runs"],
            repeat=args.repeat,
            root=args.dir,
            progress=progress,
        )
    )
    streams = check(results)
    print(f"lifecycle: {streams} streams checked, 0 violations; SQLite stored every event")
    print()
    print(report(results))


if __name__ == "__main__":
    main()
