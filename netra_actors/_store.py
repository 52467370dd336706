"""Trace persistence: runs, every event exactly as sent, and conversation histories.

``RunStore`` is the seam: the runtime only ever calls its methods, so another
engine (PostgreSQL, later) is one more class that passes the shared suite in
``tests/test_store_suite.py``. Two implementations:

``SqliteStore``
    The embedded default: one file (``data-dir/netra.sqlite3``) in WAL mode,
    schema created on first start and migrated by version (``PRAGMA
    user_version``). A single writer actor commits whatever has accumulated in
    one transaction (group commit); ``append`` returns only once its events are
    committed, and the sequencer publishes nothing before that, so no client
    ever sees an event the store could forget, and a ``seq`` is never reused
    (the key ``(session_id, seq)`` forbids it). ``synchronous=NORMAL`` (default)
    survives a process crash; ``FULL`` also survives a power loss, at the price
    of an fsync per commit.
``MemoryStore``
    The same contract in memory (nothing survives the process); the reference
    implementation of the suite, and handy in tests.

The ``runs`` table is derived from the events in the same transaction that
stores them, with the tracker's rules (``state_after``), so a run's row can
never disagree with its events.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import attrs
import orjson
import trio

from ._conversations import ConversationStore, message_from_dict, message_to_dict, trim_history
from ._exceptions import NetraError
from ._llm import ChatMessage
from ._messages import Event
from ._sequencer import encode_json, event_from_frame
from ._tracker import FINISHED_STATES, RunState, state_after

SCHEMA_VERSION = 2
#: Seconds between WAL checkpoints while writes come (each in a worker thread).
CHECKPOINT_EVERY = 0.25
logger = logging.getLogger("netra_actors.store")
DB_FILENAME = "netra.sqlite3"


class StoreError(NetraError):
    """The store refused a write (a ``seq`` that does not follow, an unknown session)."""


@attrs.frozen
class StoredSession:
    """A user's stream as stored: ``first_seq`` is the oldest event still kept."""

    session_id: str
    user_id: str
    first_seq: int
    last_seq: int
    created_at: float


@attrs.frozen
class StoredRun:
    """One run as stored (derived from its events)."""

    run_id: str
    session_id: str
    user_id: str
    thread_id: str
    state: RunState
    agent_name: str | None = None
    text: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    error: Mapping[str, Any] | None = None
    usage: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class OpenToolCall:
    """A tool call announced (``tool_executing``) but never completed."""

    call_id: str
    tool_name: str
    span_id: str


@attrs.frozen
class OpenRun:
    """A run without a terminal event (the process died while it ran)."""

    run: StoredRun
    open_calls: tuple[OpenToolCall, ...]


@runtime_checkable
class RunStore(Protocol):
    """What the runtime needs from a store. Every method is a checkpoint.

    ``run`` is the store's actor (its writer): the runtime starts it in its
    nursery and calls the other methods only after it reported started, and
    ``aclose`` before leaving. Cancelling ``run`` loses only writes whose
    ``append`` had not returned.
    """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store (create or migrate its schema) and serve writes until ``aclose``."""
        ...

    async def aclose(self) -> None:
        """Commit what is pending, stop the writer and release the store; idempotent."""
        ...

    async def session_for(self, user_id: str) -> StoredSession | None:
        """The user's stored stream, or None if the user never had one."""
        ...

    async def create_session(self, session_id: str, user_id: str) -> None:
        """Record a new, empty stream for ``user_id``. Raises ``StoreError`` if it has one."""
        ...

    async def record_queued(self, run: StoredRun) -> None:
        """Record an accepted run before it has any event (state ``queued``), so that a
        run accepted just before a crash is closed on restart too. Idempotent."""
        ...

    async def append(self, session_id: str, events: Sequence[Event]) -> None:
        """Store events (their ``seq`` must follow the session's ``last_seq``), durably,
        before returning. Raises ``StoreError`` for a ``seq`` that does not follow."""
        ...

    async def events_after(self, session_id: str, after_seq: int, limit: int) -> list[Event]:
        """Up to ``limit`` stored events with ``seq > after_seq``, oldest first."""
        ...

    async def get_run(self, run_id: str) -> StoredRun | None: ...

    async def list_runs(
        self, *, user_id: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[StoredRun]:
        """The newest runs first (by their first event)."""
        ...

    async def run_events(self, run_id: str) -> list[Event]:
        """Every stored event of the run, in ``seq`` order."""
        ...

    async def open_runs(self) -> list[OpenRun]:
        """Runs with no terminal event, with their tool calls that never completed."""
        ...

    async def prune(
        self, *, max_age: float | None, max_events: int | None, now: float | None = None
    ) -> int:
        """Drop each session's oldest events: those older than ``max_age`` seconds and all
        but the newest ``max_events``. Only a prefix of a stream goes (never a hole), and
        never an event of a run that is still open. Returns how many events went."""
        ...

    @property
    def conversations(self) -> ConversationStore:
        """The threads' histories, kept in the same store."""
        ...


# -- shared by every implementation ----------------------------------------------------------


def run_changes(event: Event) -> dict[str, Any]:
    """The ``runs`` columns an event sets (the same rules for every store)."""
    changes: dict[str, Any] = {"last_seq": event.seq}
    target = state_after(event.type, event.data)
    if target is None:
        return changes
    changes["state"] = target
    data = event.data
    if target == "running":
        changes.update(
            started_at=event.ts,
            agent_name=data.get("agent_name"),
            text=data.get("text"),
            span_id=event.span_id,
        )
    else:
        changes["ended_at"] = event.ts
        if isinstance(data.get("error"), Mapping):
            changes["error"] = dict(data["error"])
        if isinstance(data.get("usage"), Mapping):
            changes["usage"] = dict(data["usage"])
    return changes


#: The ``runs`` columns a finished run keeps whatever comes later.
GUARDED_COLUMNS = ("state", "ended_at", "error", "usage")


def fold_run_changes(events: Sequence[Event]) -> dict[str, tuple[Event, dict[str, Any]]]:
    """Per run of ``events``: its first event and the ``run_changes`` of all its events
    folded in order, as one set of changes.

    Applying the folded changes once (``first_seq`` from the first event if unset; nothing
    of ``GUARDED_COLUMNS`` if the run was already finished) leaves a run as applying each
    event's changes in turn does: a later value replaces an earlier one, and once an event
    finished the run, later events no longer change its ``GUARDED_COLUMNS`` (as they would
    not one by one: the run is finished by then). A store can so write each run of a batch
    once instead of once per event.
    """
    folded: dict[str, tuple[Event, dict[str, Any]]] = {}
    finished: set[str] = set()
    for event in events:
        changes = run_changes(event)
        seen = folded.get(event.run_id)
        if event.run_id in finished:
            for key in GUARDED_COLUMNS:
                changes.pop(key, None)
        elif changes.get("state") in FINISHED_STATES:
            finished.add(event.run_id)
        if seen is None:
            folded[event.run_id] = (event, changes)
        else:
            seen[1].update(changes)
    return folded


def open_tool_calls(events: Sequence[Event]) -> tuple[OpenToolCall, ...]:
    """The calls of ``events`` (one run's) announced and never completed, in order."""
    calls: dict[str, OpenToolCall] = {}
    for event in events:
        call_id = event.data.get("call_id")
        if not isinstance(call_id, str):
            continue
        if event.type == "tool_executing":
            calls[call_id] = OpenToolCall(call_id, str(event.data.get("tool_name")), event.span_id)
        elif event.type == "tool_completed":
            calls.pop(call_id, None)
    return tuple(calls.values())


def prune_cutoff(
    last_seq: int,
    newest_old: int | None,
    *,
    max_events: int | None,
    keep_from: int | None,
) -> int:
    """The first ``seq`` to keep of a stream that ends at ``last_seq``.

    Dropped: everything up to ``newest_old`` (the newest event older than the
    age limit; ``ts`` grows with ``seq``, so that is a prefix) and all but the
    newest ``max_events``; never ``keep_from`` (the first event of an open run)
    or anything after it.
    """
    cutoff = 0
    if max_events is not None:
        cutoff = max(cutoff, last_seq - max_events + 1)
    if newest_old is not None:
        cutoff = max(cutoff, newest_old + 1)
    if keep_from is not None:
        cutoff = min(cutoff, keep_from)
    return cutoff


# -- in memory ------------------------------------------------------------------------------


class MemoryConversations:
    """A ``ConversationStore`` view of a ``MemoryStore``."""

    def __init__(self, max_messages: int) -> None:
        self.max_messages = max_messages
        self._threads: dict[tuple[str, str], list[ChatMessage]] = {}

    async def load(self, user_id: str, thread_id: str) -> list[ChatMessage]:
        await trio.lowlevel.checkpoint()
        return trim_history(self._threads.get((user_id, thread_id), []), self.max_messages)

    async def append(self, user_id: str, thread_id: str, messages: Sequence[ChatMessage]) -> None:
        await trio.lowlevel.checkpoint()
        history = self._threads.setdefault((user_id, thread_id), [])
        history.extend(messages)
        del history[: -self.max_messages]


class MemoryStore:
    """The ``RunStore`` contract in memory: nothing survives the process."""

    def __init__(self, *, max_messages: int = 200) -> None:
        self._sessions: dict[str, StoredSession] = {}
        self._by_user: dict[str, str] = {}
        self._events: dict[str, list[Event]] = {}
        self._runs: dict[str, StoredRun] = {}
        self._conversations = MemoryConversations(max_messages)
        self._closed = trio.Event()

    @property
    def conversations(self) -> ConversationStore:
        return self._conversations

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._closed.wait()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed.set()

    async def session_for(self, user_id: str) -> StoredSession | None:
        await trio.lowlevel.checkpoint()
        session_id = self._by_user.get(user_id)
        return self._sessions[session_id] if session_id is not None else None

    async def create_session(self, session_id: str, user_id: str) -> None:
        await trio.lowlevel.checkpoint()
        if user_id in self._by_user or session_id in self._sessions:
            raise StoreError(f"user {user_id!r} already has a stored stream")
        self._sessions[session_id] = StoredSession(session_id, user_id, 1, 0, time.time())
        self._by_user[user_id] = session_id
        self._events[session_id] = []

    async def record_queued(self, run: StoredRun) -> None:
        await trio.lowlevel.checkpoint()
        self._runs.setdefault(run.run_id, run)

    async def append(self, session_id: str, events: Sequence[Event]) -> None:
        await trio.lowlevel.checkpoint()
        self._append_now(session_id, events)

    def append_soon(
        self,
        session_id: str,
        events: Sequence[Event],
        done: Callable[[BaseException | None], None],
    ) -> None:
        """``append`` without a task waiting: stored at once, then ``done`` is called."""
        try:
            self._append_now(session_id, events)
        except StoreError as exc:
            done(exc)
        else:
            done(None)

    def _append_now(self, session_id: str, events: Sequence[Event]) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            raise StoreError(f"no stored session {session_id!r}")
        for expected, event in enumerate(events, session.last_seq + 1):
            if event.seq != expected:
                raise StoreError(f"seq {event.seq} does not follow {expected - 1}")
        self._events[session_id].extend(events)
        if events:
            self._sessions[session_id] = attrs.evolve(session, last_seq=events[-1].seq)
        # One event at a time: the reference the SQLite store's folded writes
        # (``fold_run_changes``) are checked against by the model test.
        for event in events:
            run = self._runs.get(event.run_id)
            changes = run_changes(event)
            if run is None:
                run = StoredRun(
                    event.run_id,
                    session_id,
                    session.user_id,
                    event.thread_id,
                    "running",
                    trace_id=event.trace_id,
                    first_seq=event.seq,
                )
            elif run.state in FINISHED_STATES:
                for key in GUARDED_COLUMNS:
                    changes.pop(key, None)
            if run.first_seq is None:
                changes["first_seq"] = event.seq
            self._runs[event.run_id] = attrs.evolve(run, **changes)

    async def events_after(self, session_id: str, after_seq: int, limit: int) -> list[Event]:
        await trio.lowlevel.checkpoint()
        return [e for e in self._events.get(session_id, []) if e.seq > after_seq][:limit]

    async def get_run(self, run_id: str) -> StoredRun | None:
        await trio.lowlevel.checkpoint()
        return self._runs.get(run_id)

    async def list_runs(
        self, *, user_id: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[StoredRun]:
        await trio.lowlevel.checkpoint()
        runs = [
            r
            for r in self._runs.values()
            if (user_id is None or r.user_id == user_id) and (state is None or r.state == state)
        ]
        runs.sort(key=lambda r: (r.first_seq or 0, r.run_id), reverse=True)
        runs.sort(key=lambda r: r.started_at or r.queued_at or r.ended_at or 0.0, reverse=True)
        return runs[:limit]

    async def run_events(self, run_id: str) -> list[Event]:
        await trio.lowlevel.checkpoint()
        run = self._runs.get(run_id)
        if run is None:
            return []
        return [e for e in self._events.get(run.session_id, []) if e.run_id == run_id]

    async def open_runs(self) -> list[OpenRun]:
        await trio.lowlevel.checkpoint()
        runs = sorted(
            (run for run in self._runs.values() if run.state not in FINISHED_STATES),
            key=lambda r: (r.first_seq is None, r.first_seq or 0, r.queued_at or 0.0, r.run_id),
        )
        return [OpenRun(run, open_tool_calls(await self.run_events(run.run_id))) for run in runs]

    async def prune(
        self, *, max_age: float | None, max_events: int | None, now: float | None = None
    ) -> int:
        await trio.lowlevel.checkpoint()
        now = time.time() if now is None else now
        dropped = 0
        for session_id, session in list(self._sessions.items()):
            events = self._events[session_id]
            open_firsts = [
                r.first_seq
                for r in self._runs.values()
                if r.session_id == session_id
                and r.state not in FINISHED_STATES
                and r.first_seq is not None
            ]
            horizon = -math.inf if max_age is None else now - max_age
            cutoff = prune_cutoff(
                session.last_seq,
                max((e.seq for e in events if e.ts < horizon), default=None),
                max_events=max_events,
                keep_from=min(open_firsts, default=None),
            )
            if cutoff <= session.first_seq:
                continue
            kept = [e for e in events if e.seq >= cutoff]
            dropped += len(events) - len(kept)
            self._events[session_id] = kept
            self._sessions[session_id] = attrs.evolve(session, first_seq=cutoff)
            for run_id, run in list(self._runs.items()):
                finished = run.state in FINISHED_STATES
                if run.session_id == session_id and finished and (run.last_seq or 0) < cutoff:
                    del self._runs[run_id]
        return dropped


# -- SQLite ---------------------------------------------------------------------------------

#: Schema migrations: ``MIGRATIONS[n]`` takes a database from version n to n + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        user_id    TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        first_seq  INTEGER NOT NULL DEFAULT 1,
        last_seq   INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        run_id     TEXT NOT NULL,
        type       TEXT NOT NULL,
        ts         REAL NOT NULL,
        frame      TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    CREATE INDEX events_by_run ON events (run_id, seq);
    CREATE TABLE runs (
        run_id     TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        user_id    TEXT NOT NULL,
        thread_id  TEXT NOT NULL,
        state      TEXT NOT NULL,
        agent_name TEXT,
        text       TEXT,
        trace_id   TEXT,
        span_id    TEXT,
        queued_at  REAL,
        started_at REAL,
        ended_at   REAL,
        first_seq  INTEGER,
        last_seq   INTEGER,
        error      TEXT,
        usage      TEXT
    );
    CREATE INDEX runs_by_user ON runs (user_id, first_seq);
    CREATE INDEX runs_by_state ON runs (state);
    CREATE TABLE messages (
        user_id   TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        pos       INTEGER NOT NULL,
        body      TEXT NOT NULL,
        PRIMARY KEY (user_id, thread_id, pos)
    ) WITHOUT ROWID;
    """,
    # v2: a run's events are found by the seq range its row keeps (first_seq..last_seq),
    # so every event insert no longer updates a second b-tree (about half its cost).
    """
    DROP INDEX events_by_run;
    """,
)

_RUN_COLUMNS = tuple(f.name for f in attrs.fields(StoredRun))
_OPEN = "('queued', 'running')"
#: What ``record_queued`` stores (a queued run has no error or usage yet).
_QUEUED_COLUMNS = tuple(c for c in _RUN_COLUMNS if c not in ("error", "usage"))
_INSERT_QUEUED = (
    f"INSERT OR IGNORE INTO runs ({', '.join(_QUEUED_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _QUEUED_COLUMNS)})"
)
#: The columns a run's first event sets when it makes the row (``state`` unless changed).
_FRESH_COLUMNS = ("run_id", "session_id", "user_id", "thread_id", "state", "trace_id", "first_seq")
#: ``_upsert_sql`` by the changed columns (their order included): built once each.
_UPSERTS: dict[tuple[str, ...], str] = {}


#: ``_insert_events`` writes events in statements of a power of two of rows, at most this.
_INSERT_CHUNK = 256
_INSERTS = {
    rows: "INSERT INTO events (session_id, seq, run_id, type, ts, frame) VALUES "
    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    for rows in (1 << k for k in range(_INSERT_CHUNK.bit_length()))
}


def _insert_events(db: sqlite3.Connection, session_id: str, events: Sequence[Event]) -> None:
    """Insert ``events`` of one session, several rows a statement.

    A statement of many rows costs about 30% less per row than ``executemany`` (no
    statement reset between rows), and the writer thread gives up and takes back the
    GIL once a statement instead of once a row: the trio thread is not made to hand
    the GIL over for every event stored. The statements have a power-of-two number
    of rows (``_INSERT_CHUNK`` at most), so a few prepared ones serve every batch.
    """
    done, count = 0, len(events)
    while done < count:
        rows = min(_INSERT_CHUNK, 1 << ((count - done).bit_length() - 1))
        values: list[Any] = []
        for e in events[done : done + rows]:
            values += (session_id, e.seq, e.run_id, e.type, e.ts, e.frame)
        db.execute(_INSERTS[rows], values)
        done += rows


def _upsert_sql(changed: tuple[str, ...]) -> str:
    """The upsert of a run's folded changes (``changed``: their columns, in order).

    Its parameters: ``_FRESH_COLUMNS``, then the changed columns other than ``state``.
    A new run gets them all; a known run gets the changed columns and ``first_seq`` if
    it had none, except that a finished run keeps its ``GUARDED_COLUMNS`` (the store
    never moves it again).
    """
    sql = _UPSERTS.get(changed)
    if sql is None:
        columns = _FRESH_COLUMNS + tuple(c for c in changed if c != "state")
        updates = ", ".join(
            [
                f"{c} = CASE WHEN runs.state IN {_OPEN} THEN excluded.{c} ELSE runs.{c} END"
                if c in GUARDED_COLUMNS
                else f"{c} = excluded.{c}"
                for c in changed
            ]
            + ["first_seq = coalesce(runs.first_seq, excluded.first_seq)"]
        )
        sql = _UPSERTS[changed] = (
            f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT (run_id) DO UPDATE SET {updates}"
        )
    return sql


def _run_from_row(row: sqlite3.Row) -> StoredRun:
    values = dict(row)
    for key in ("error", "usage"):
        if values[key] is not None:
            values[key] = orjson.loads(values[key])
    return StoredRun(**values)


@attrs.define
class _Write:
    """One request to the writer actor, answered by setting ``done``."""

    apply: Callable[[sqlite3.Connection], None]
    done: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None
    #: Called (in the trio thread) once the write committed or failed, with its error.
    then: Callable[[BaseException | None], None] | None = None

    def settle(self, error: BaseException | None = None) -> None:
        """Mark the write done (with ``error`` if it failed) and call ``then``."""
        if error is not None:
            self.error = error
        self.done.set()
        if self.then is not None:
            try:
                self.then(self.error)
            except Exception:
                logger.exception("a store write's callback failed")


class _Miss:
    """A ``load`` reading the file; ``stale`` if an append of its thread was not done when
    it started or came while it read (what it read may then lack that append)."""

    __slots__ = ("stale",)

    def __init__(self, stale: bool) -> None:
        self.stale = stale


class SqliteConversations:
    """A ``ConversationStore`` view of a ``SqliteStore`` (histories survive restarts).

    The parsed histories of the ``cached_threads`` most recently used threads stay in
    memory (least recently used out first), written through: ``load`` of a cached
    thread reads and parses nothing (a run used to re-read up to ``max_messages``
    messages, the SQLite store's main cost per run), and an append extends the cached
    history once its write committed. That is correct because the runtime is the only
    writer of its file. A cached history is what the file holds for the thread (its
    newest ``max_messages``, each as read back from JSON); ``load`` trims it as it
    trims what it reads, and returns a new list (of the cached messages, which are
    frozen, as ``MemoryStore`` shares its own).

    Appends reach the cache in the order they committed (the order they were
    submitted: one writer), whichever task resumes first. Where the file's content
    is not known, the cache forgets the thread (the next ``load`` reads the file): an
    append that failed or was cancelled (it may still commit), and a ``load`` that
    read while an append of its thread was pending keeps nothing.
    """

    def __init__(self, store: SqliteStore, max_messages: int, cached_threads: int = 1024) -> None:
        self._store = store
        self.max_messages = max_messages
        self.cached_threads = cached_threads
        self._cache: OrderedDict[tuple[str, str], list[ChatMessage]] = OrderedDict()
        #: Per thread, in commit order: appends not yet applied to the cache, with their
        #: messages as a load would read them back.
        self._appends: dict[tuple[str, str], deque[tuple[_Write, list[ChatMessage]]]] = {}
        #: Per thread: loads reading the file.
        self._misses: dict[tuple[str, str], list[_Miss]] = {}

    async def load(self, user_id: str, thread_id: str) -> list[ChatMessage]:
        key = (user_id, thread_id)
        if key in self._cache:
            await trio.lowlevel.checkpoint()
            self._settle(key)
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return trim_history(cached, self.max_messages)
        miss = _Miss(stale=self._settle(key))
        self._misses.setdefault(key, []).append(miss)
        try:
            rows = await self._store._read(
                "SELECT body FROM messages WHERE user_id = ? AND thread_id = ? "
                "ORDER BY pos DESC LIMIT ?",
                (user_id, thread_id, self.max_messages),
            )
        finally:
            misses = self._misses[key]
            misses.remove(miss)
            if not misses:
                del self._misses[key]
        messages = [message_from_dict(orjson.loads(row["body"])) for row in reversed(rows)]
        if not miss.stale:
            self._remember(key, messages)
        return trim_history(messages, self.max_messages)

    async def append(self, user_id: str, thread_id: str, messages: Sequence[ChatMessage]) -> None:
        key = (user_id, thread_id)
        bodies = [orjson.dumps(message_to_dict(m)).decode() for m in messages]
        # As a load would read them back (JSON turns a tuple into a list, ...).
        stored = [message_from_dict(orjson.loads(body)) for body in bodies]

        def apply(db: sqlite3.Connection) -> None:
            (last,) = db.execute(
                "SELECT coalesce(max(pos), 0) FROM messages WHERE user_id = ? AND thread_id = ?",
                (user_id, thread_id),
            ).fetchone()
            db.executemany(
                "INSERT INTO messages (user_id, thread_id, pos, body) VALUES (?, ?, ?, ?)",
                [(user_id, thread_id, last + i, body) for i, body in enumerate(bodies, 1)],
            )
            # Keep the newest max_messages (load trims a leading tool message further).
            db.execute(
                "DELETE FROM messages WHERE user_id = ? AND thread_id = ? AND pos <= ?",
                (user_id, thread_id, last + len(bodies) - self.max_messages),
            )

        write = self._store._submit(apply)
        self._appends.setdefault(key, deque()).append((write, stored))
        for miss in self._misses.get(key, ()):
            miss.stale = True
        try:
            await self._store._settled(write)
        except BaseException:
            self._cache.pop(key, None)
            raise
        finally:
            self._settle(key)

    def _settle(self, key: tuple[str, str]) -> bool:
        """Apply the thread's done appends to its cached history, oldest first, up to the
        first not done; a failed one forgets the thread. True if some are not done."""
        pending = self._appends.get(key)
        if pending is None:
            return False
        while pending and pending[0][0].done.is_set():
            write, stored = pending.popleft()
            cached = self._cache.get(key)
            if write.error is not None:
                self._cache.pop(key, None)
            elif cached is not None:
                cached.extend(stored)
                del cached[: max(0, len(cached) - self.max_messages)]
        if pending:
            return True
        del self._appends[key]
        return False

    def _remember(self, key: tuple[str, str], messages: list[ChatMessage]) -> None:
        """Cache a thread's history as read, as the most recently used."""
        if self.cached_threads <= 0:
            return
        self._cache[key] = messages
        self._cache.move_to_end(key)
        while len(self._cache) > self.cached_threads:
            self._cache.popitem(last=False)


class SqliteStore:
    """The ``RunStore`` in one SQLite file (WAL mode), written by one group-commit actor.

    ``synchronous``: ``"NORMAL"`` (a committed event survives a process crash)
    or ``"FULL"`` (it also survives a power loss or OS crash). ``cached_threads``:
    how many threads' histories ``conversations`` keeps parsed in memory (0: none;
    see ``SqliteConversations``). ``linger``: while writes keep coming (the
    previous commit ended less than ten lingers ago), the writer waits this many
    seconds before committing, so every session's writes of that moment share one
    commit; a write after a quiet spell is committed at once.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] | str = "NORMAL",
        max_messages: int = 200,
        max_batch: int = 1024,
        cached_threads: int = 1024,
        linger: float = 0.0,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.linger = linger
        self._conversations = SqliteConversations(self, max_messages, cached_threads)
        self._send, self._receive = trio.open_memory_channel[_Write](math.inf)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointing = False
        self._checkpointed = trio.Event()  # set (and replaced) after each checkpoint
        #: WAL checkpoints made (off the commit path, see ``_checkpoint``).
        self.checkpoints = 0
        self._read_lock = trio.Lock()
        self._stopped = trio.Event()
        #: Commits made, and writes they carried (group commit: writes >= commits).
        self.commits = 0
        self.writes = 0

    @property
    def conversations(self) -> ConversationStore:
        return self._conversations

    # -- the writer actor ---------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        return db

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect()
        (version,) = writer.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            writer.close()
            raise StoreError(
                f"{self.path} has schema version {version}; this netra_actors knows "
                f"up to {len(MIGRATIONS)}"
            )
        for target, script in enumerate(MIGRATIONS[version:], version + 1):
            writer.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        writer.execute(statement)
                writer.execute(f"PRAGMA user_version = {target}")
                writer.execute("COMMIT")
            except BaseException:
                writer.execute("ROLLBACK")
                writer.close()
                raise
        # The writer never checkpoints inside a commit (a checkpoint there holds up
        # every session waiting for that commit); _checkpoint does it on the side.
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        self._writer = writer
        self._reader = self._connect()
        self._checkpointer = self._connect()

    def _checkpoint(self) -> None:
        """Copy committed WAL pages into the database file (PASSIVE: never blocks the
        writer or a reader), so the WAL is reused instead of growing."""
        db = self._checkpointer
        if db is not None:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def _checkpoint_in_thread(self) -> None:
        try:
            await trio.to_thread.run_sync(self._checkpoint)
            self.checkpoints += 1
        except sqlite3.Error:
            logger.warning("WAL checkpoint of %s failed", self.path, exc_info=True)
        finally:
            self._checkpointing = False
            self._checkpointed.set()
            self._checkpointed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file and commit writes until ``aclose``; see the module docstring."""
        await trio.to_thread.run_sync(self._open)
        batch: list[_Write] = []
        previous = last_checkpoint = -math.inf
        try:
            async with trio.open_nursery() as background:
                task_status.started()
                async for first in self._receive:
                    batch = [first]
                    if self.linger and trio.current_time() - previous < 10 * self.linger:
                        await trio.sleep(self.linger)  # busy: let this moment's writes gather
                    while len(batch) < self.max_batch:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    # Not abandoned on cancel: a commit that started completes, and its
                    # writers are told so before the next checkpoint.
                    await trio.to_thread.run_sync(self._commit, batch)
                    for write in batch:
                        write.settle()
                    batch = []
                    previous = trio.current_time()
                    if not self._checkpointing and previous - last_checkpoint >= CHECKPOINT_EVERY:
                        self._checkpointing, last_checkpoint = True, previous
                        background.start_soon(self._checkpoint_in_thread)
        finally:
            # Writes not committed (the batch in flight if the commit failed or never
            # ran, and whatever is queued) fail instead of waiting forever.
            for write in batch + self._pending():
                if not write.done.is_set():
                    write.settle(StoreError("the store was closed before this write"))
            self._receive.close()
            try:
                trio.lowlevel.current_task()
            except RuntimeError:  # the coroutine is being closed outside trio (collected)
                self._close_files()
            else:
                with trio.CancelScope(shield=True):
                    # A read still running in its worker thread (the retention's prune at
                    # shutdown, say) finishes first: its connection is not closed under it.
                    async with self._read_lock:
                        await trio.to_thread.run_sync(self._close_files)
                self._stopped.set()

    def _pending(self) -> list[_Write]:
        pending = []
        while True:
            try:
                pending.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return pending

    def _commit(self, batch: list[_Write]) -> None:
        """One transaction for the whole batch; a failing write rolls back only itself.

        Optimistic: the batch runs without a savepoint per write (two statements each,
        as much as a row insert). Should a write fail, the transaction is rolled back
        and the batch runs again with savepoints, which undo the failing writes only.
        So a write's ``apply`` may run twice, the first run rolled back: it must not
        change anything but the database.
        """
        if not self._transaction(batch, careful=False):
            self._transaction(batch, careful=True)
        self.commits += 1
        self.writes += len(batch)

    def _transaction(self, batch: list[_Write], *, careful: bool) -> bool:
        """Apply ``batch`` in one transaction and commit; ``False`` (rolled back) when
        a write failed and the batch was not ``careful``."""
        db = self._writer
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            for write in batch:
                if careful:
                    db.execute("SAVEPOINT one")
                try:
                    write.apply(db)
                except (sqlite3.Error, StoreError) as exc:
                    if not careful:
                        db.execute("ROLLBACK")
                        return False
                    db.execute("ROLLBACK TO one")
                    write.error = (
                        exc if isinstance(exc, StoreError) else StoreError(f"store write: {exc}")
                    )
                if careful:
                    db.execute("RELEASE one")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return True

    def _close_files(self) -> None:
        for db in (self._writer, self._reader, self._checkpointer):
            if db is not None:
                db.close()
        self._writer = self._reader = self._checkpointer = None

    async def aclose(self) -> None:
        self._send.close()
        if self._writer is not None or self._reader is not None:
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def _write(self, apply: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``apply`` in the writer's next transaction; return once it committed.

        ``apply`` may run twice (see ``_commit``): it changes the database only.
        """
        await self._settled(self._submit(apply))

    def _submit(self, apply: Callable[[sqlite3.Connection], None]) -> _Write:
        """Queue ``apply`` for the writer (``_settled`` waits for it)."""
        write = _Write(apply)
        try:
            self._send.send_nowait(write)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreError("the store is closed") from None
        return write

    @staticmethod
    async def _settled(write: _Write) -> None:
        """Wait until ``write`` committed; raise what refused it."""
        await write.done.wait()
        if write.error is not None:
            raise write.error

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._read_lock:
            db = self._reader
            if db is None:
                raise StoreError("the store is not open")
            return await trio.to_thread.run_sync(lambda: db.execute(sql, params).fetchall())

    # -- the RunStore methods -----------------------------------------------------------------

    async def session_for(self, user_id: str) -> StoredSession | None:
        rows = await self._read(
            "SELECT session_id, user_id, first_seq, last_seq, created_at FROM sessions "
            "WHERE user_id = ?",
            (user_id,),
        )
        return StoredSession(**dict(rows[0])) if rows else None

    async def create_session(self, session_id: str, user_id: str) -> None:
        def apply(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO sessions (session_id, user_id, created_at) VALUES (?, ?, ?)",
                    (session_id, user_id, time.time()),
                )
            except sqlite3.IntegrityError:
                raise StoreError(f"user {user_id!r} already has a stored stream") from None

        await self._write(apply)

    async def append(self, session_id: str, events: Sequence[Event]) -> None:
        await self._write(self._append_apply(session_id, list(events)))

    def append_soon(
        self,
        session_id: str,
        events: Sequence[Event],
        done: Callable[[BaseException | None], None],
    ) -> None:
        """``append`` without a task waiting: queued for the writer's next commit
        (group commit with every other session's writes); ``done`` is called from the
        trio thread once it committed (``None``) or failed (the error)."""
        write = _Write(self._append_apply(session_id, list(events)), then=done)
        try:
            self._send.send_nowait(write)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            write.settle(StoreError("the store is closed"))

    def _append_apply(
        self, session_id: str, events: list[Event]
    ) -> Callable[[sqlite3.Connection], None]:
        """The writer's work for one ``append`` (checks ``seq``, stores, projects runs)."""

        def apply(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT user_id, last_seq FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no stored session {session_id!r}")
            user_id, last_seq = row
            for expected, event in enumerate(events, last_seq + 1):
                if event.seq != expected:
                    raise StoreError(f"seq {event.seq} does not follow {expected - 1}")
            if not events:
                return
            _insert_events(db, session_id, events)
            db.execute(
                "UPDATE sessions SET last_seq = ? WHERE session_id = ?",
                (events[-1].seq, session_id),
            )
            # One upsert per run of the batch, not per event (a run's events mostly come
            # together: the sequencer coalesces them into one append).
            for first, changes in fold_run_changes(events).values():
                self._project(db, session_id, user_id, first, changes)

        return apply

    @staticmethod
    def _project(
        db: sqlite3.Connection,
        session_id: str,
        user_id: str,
        first: Event,
        changes: dict[str, Any],
    ) -> None:
        """Write one run's folded changes (``fold_run_changes``), ``first`` its first event."""
        values = [
            first.run_id,
            session_id,
            user_id,
            first.thread_id,
            changes.get("state", "running"),
            first.trace_id,
            first.seq,
        ]
        for key, value in changes.items():
            if key in ("error", "usage"):
                # As the sequencer encodes events: values JSON cannot carry become text.
                values.append(encode_json(value))
            elif key != "state":
                values.append(value)
        db.execute(_upsert_sql(tuple(changes)), values)

    async def record_queued(self, run: StoredRun) -> None:
        values = tuple(getattr(run, column) for column in _QUEUED_COLUMNS)

        def apply(db: sqlite3.Connection) -> None:
            db.execute(_INSERT_QUEUED, values)

        await self._write(apply)

    async def events_after(self, session_id: str, after_seq: int, limit: int) -> list[Event]:
        rows = await self._read(
            "SELECT frame FROM events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (session_id, after_seq, limit),
        )
        return [event_from_frame(row["frame"]) for row in rows]

    async def get_run(self, run_id: str) -> StoredRun | None:
        rows = await self._read(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
        )
        return _run_from_row(rows[0]) if rows else None

    async def list_runs(
        self, *, user_id: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[StoredRun]:
        where, params = [], []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs {clause} "
            "ORDER BY coalesce(started_at, queued_at, ended_at) DESC, first_seq DESC, "
            "run_id DESC LIMIT ?",
            (*params, limit),
        )
        return [_run_from_row(row) for row in rows]

    async def run_events(self, run_id: str) -> list[Event]:
        rows = await self._read(
            "SELECT e.frame FROM runs r JOIN events e ON e.session_id = r.session_id "
            "AND e.seq BETWEEN r.first_seq AND r.last_seq "
            "WHERE r.run_id = ? AND e.run_id = ? ORDER BY e.seq",
            (run_id, run_id),
        )
        return [event_from_frame(row["frame"]) for row in rows]

    async def open_runs(self) -> list[OpenRun]:
        rows = await self._read(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE state IN {_OPEN} "
            "ORDER BY first_seq IS NULL, first_seq, queued_at, run_id"
        )
        return [
            OpenRun(run, open_tool_calls(await self.run_events(run.run_id)))
            for run in map(_run_from_row, rows)
        ]

    async def prune(
        self, *, max_age: float | None, max_events: int | None, now: float | None = None
    ) -> int:
        now = time.time() if now is None else now
        dropped = 0
        sessions = await self._read("SELECT session_id, first_seq, last_seq FROM sessions")
        for session in sessions:
            session_id = session["session_id"]
            newest_old = None
            if max_age is not None:
                rows = await self._read(
                    "SELECT max(seq) AS seq FROM events WHERE session_id = ? AND ts < ?",
                    (session_id, now - max_age),
                )
                newest_old = rows[0]["seq"]
            opened = await self._read(
                f"SELECT min(first_seq) AS seq FROM runs WHERE session_id = ? AND state IN {_OPEN}",
                (session_id,),
            )
            cutoff = prune_cutoff(
                session["last_seq"],
                newest_old,
                max_events=max_events,
                keep_from=opened[0]["seq"],
            )
            if cutoff <= session["first_seq"]:
                continue
            counted: list[int] = []

            def apply(
                db: sqlite3.Connection,
                session_id: str = session_id,
                cutoff: int = cutoff,
                counted: list[int] = counted,
            ) -> None:
                cursor = db.execute(
                    "DELETE FROM events WHERE session_id = ? AND seq < ?", (session_id, cutoff)
                )
                counted[:] = [cursor.rowcount]  # a rolled-back first run is not counted
                db.execute(
                    "UPDATE sessions SET first_seq = max(first_seq, ?) WHERE session_id = ?",
                    (cutoff, session_id),
                )
                db.execute(
                    f"DELETE FROM runs WHERE session_id = ? AND last_seq < ? "
                    f"AND state NOT IN {_OPEN}",
                    (session_id, cutoff),
                )

            await self._write(apply)
            dropped += sum(counted)
        return dropped


def open_store(data_dir: Path, *, synchronous: str = "NORMAL", linger: float = 0.0) -> SqliteStore:
    """The default store of a data folder."""
    return SqliteStore(Path(data_dir) / DB_FILENAME, synchronous=synchronous, linger=linger)
