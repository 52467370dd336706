"""Thread policies: what a ``user_message`` does to a thread that already has a run
(``enqueue``, ``reject``, ``interrupt``), the per-thread queue limit, the per-user cap on
concurrently active runs, and cancelling a queued run.

Memory transports and virtual time (``autojump_clock``, or ``MockClock(autojump_threshold=0)``
in the model-based property). The demo agent's "sleep S" run takes exactly S virtual
seconds; "hello" completes at once. Every stream goes through ``check_lifecycle``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import attrs
import hypothesis
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from strategies import Frame, MemoryClient, connect, is_terminal

from netra_actors import Config, RunRefused, Runtime
from netra_actors.testing import check_lifecycle

#: Virtual seconds; every test here needs far less.
BOUND = 600

# --- helpers -------------------------------------------------------------------------------------


async def send_message(
    client: MemoryClient,
    text: str,
    *,
    thread: str = "main",
    policy: str | None = None,
    client_msg_id: str,
) -> Frame:
    """Send a ``user_message``; its reply (``run_accepted`` or ``error``), matched by client_msg_id."""
    start = len(client.frames)
    fields: dict[str, Any] = {"thread_id": thread, "client_msg_id": client_msg_id}
    if policy is not None:
        fields["policy"] = policy
    await client.send(type="user_message", text=text, **fields)
    return await client.wait_for(
        lambda f: (
            f["type"] in ("run_accepted", "error") and f.get("client_msg_id") == client_msg_id
        ),
        start=start,
    )


async def accepted(client: MemoryClient, text: str, **kwargs: Any) -> str:
    reply = await send_message(client, text, **kwargs)
    assert reply["type"] == "run_accepted", reply
    return str(reply["run_id"])


def types(client: MemoryClient, run_id: str) -> list[str]:
    return [f["type"] for f in client.run_events(run_id)]


def position(client: MemoryClient, run_id: str, kind: str) -> int:
    """The ``seq`` of the run's first event of type ``kind``."""
    return next(f["seq"] for f in client.run_events(run_id) if f["type"] == kind)


def started_at(client: MemoryClient, run_id: str) -> float:
    return time_of(client, run_id, "agent_started")


def time_of(client: MemoryClient, run_id: str, kind: str) -> float:
    events, times = client.run_events(run_id), client.run_event_times(run_id)
    return next(t for f, t in zip(events, times, strict=True) if f["type"] == kind)


def ended_at(client: MemoryClient, run_id: str) -> float:
    return client.run_event_times(run_id)[-1]


def terminal(client: MemoryClient, run_id: str) -> Frame:
    last = client.run_events(run_id)[-1]
    assert is_terminal(last), last
    return last


def assert_threads_never_overlap(client: MemoryClient) -> None:
    """Per thread, the runs' [agent_started .. terminal] seq intervals are disjoint."""
    intervals: dict[str, list[tuple[int, int]]] = {}
    report = check_lifecycle(client.frames)
    for run in report.runs.values():
        if run.event_types[0] == "agent_started":
            intervals.setdefault(run.thread_id, []).append((run.first_seq, run.last_seq))
    for thread, spans in intervals.items():
        spans.sort()
        for (_, end), (begin, _) in itertools.pairwise(spans):
            assert end < begin, f"thread {thread!r}: runs overlap: {spans}"


# --- enqueue -------------------------------------------------------------------------------------


async def test_enqueue_runs_one_after_another_then_limit_exceeded(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """enqueue: a thread's runs run one after another in arrival order; past max_queued_per_thread → error limit_exceeded with client_msg_id."""
    config = make_config(thread_policy="enqueue", max_queued_per_thread=2)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            runs = [
                await accepted(client, text, thread="t", client_msg_id=f"m{i}")
                for i, text in enumerate(["sleep 3", "sleep 2", "hello"])
            ]
            refused = await send_message(client, "sleep 1", thread="t", client_msg_id="m3")
            stats = runtime.session_statistics("alice")
            for run_id in runs:
                await client.wait_terminal(run_id)
            later = await accepted(client, "hello", thread="t", client_msg_id="m4")
            await client.wait_terminal(later)
            await client.close()

    assert stats is not None
    assert (stats.active_runs, stats.queued_runs) == (1, 2)
    assert refused["type"] == "error"
    assert refused["code"] == "limit_exceeded"
    assert refused["client_msg_id"] == "m3"
    assert [started_at(client, r) - start for r in runs] == pytest.approx([0, 3, 5])
    assert [ended_at(client, r) - start for r in runs] == pytest.approx([3, 5, 5])
    for earlier, next_run in zip(runs, [*runs[1:], later], strict=True):
        assert position(client, earlier, terminal(client, earlier)["type"]) < position(
            client, next_run, "agent_started"
        )
    for i, run_id in enumerate(runs):
        assert terminal(client, run_id)["type"] == "agent_completed"
        assert client.run_events(run_id)[0]["data"]["client_msg_id"] == f"m{i}"
    assert_threads_never_overlap(client)


# --- reject --------------------------------------------------------------------------------------


async def test_reject_refuses_while_busy_and_leaves_the_active_run_alone(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """reject: while a run is active → error busy, the active run completes untouched; afterwards a message is accepted."""
    config = make_config(thread_policy="reject")
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            active = await accepted(client, "sleep 5", thread="t", client_msg_id="m0")
            await client.wait_event(active, "tool_executing")
            busy = await send_message(client, "hello", thread="t", client_msg_id="m1")
            other = await accepted(client, "hello", thread="u", client_msg_id="m2")
            await client.wait_terminal(active)
            after = await accepted(client, "hello", thread="t", client_msg_id="m3")
            await client.wait_terminal(after)
            await client.wait_terminal(other)
            await client.close()

    assert busy["type"] == "error"
    assert busy["code"] == "busy"
    assert busy["client_msg_id"] == "m1"
    assert types(client, active) == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "partial_result",
        "partial_result",
        "partial_result",
        "partial_result",
        "agent_completed",
    ]
    assert ended_at(client, active) - start == pytest.approx(5)
    assert terminal(client, after)["type"] == "agent_completed"
    assert terminal(client, other)["type"] == "agent_completed"
    assert_threads_never_overlap(client)


# --- interrupt -----------------------------------------------------------------------------------


async def test_interrupt_cancels_active_and_queued_runs_first(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """interrupt: the tool ends cancelled, then the active run's agent_cancelled (interrupted), before the new run's agent_started; queued runs get a lone agent_cancelled."""
    config = make_config(thread_policy="enqueue")
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await connect(nursery, runtime, "alice")
            other = await accepted(client, "sleep 3", thread="u", client_msg_id="o")
            active = await accepted(client, "sleep 30", thread="t", client_msg_id="m0")
            queued = [
                await accepted(client, text, thread="t", client_msg_id=f"m{i}")
                for i, text in ((1, "sleep 1"), (2, "hello"))
            ]
            await client.wait_event(active, "tool_executing")
            await trio.sleep(1)
            interrupted_at = trio.current_time()
            new = await accepted(
                client, "what is 2+3*4?", thread="t", policy="interrupt", client_msg_id="m3"
            )
            await client.wait_terminal(new)
            await client.wait_terminal(other)
            await client.close()

    assert types(client, active) == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_cancelled",
    ]
    tool_completed = client.run_events(active)[3]
    assert tool_completed["data"]["status"] == "cancelled"
    assert terminal(client, active)["data"]["reason"] == "interrupted"
    assert ended_at(client, active) == interrupted_at
    for run_id in queued:
        assert types(client, run_id) == ["agent_cancelled"]
        assert terminal(client, run_id)["data"]["reason"] == "interrupted"
    assert position(client, active, "agent_cancelled") < position(client, new, "agent_started")
    assert started_at(client, new) == interrupted_at
    assert terminal(client, new)["type"] == "agent_completed"
    assert "14" in terminal(client, new)["data"]["final_response"]
    # Another thread is not touched.
    assert terminal(client, other)["type"] == "agent_completed"
    assert_threads_never_overlap(client)


# --- per-message policy --------------------------------------------------------------------------

OUTCOME = {"enqueue": "queued", "reject": "busy", "interrupt": "interrupted"}


@pytest.mark.parametrize("configured", ["enqueue", "reject", "interrupt"])
@pytest.mark.parametrize("given_policy", [None, "enqueue", "reject", "interrupt"])
async def test_message_policy_overrides_the_configured_one(
    configured: str,
    given_policy: str | None,
    make_config: Callable[..., Config],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A user_message's "policy" decides for a busy thread; without it the configured thread_policy applies."""
    config = make_config(thread_policy=configured)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            first = await accepted(client, "sleep 10", thread="t", client_msg_id="m0")
            await client.wait_event(first, "tool_executing")
            reply = await send_message(
                client, "hello", thread="t", policy=given_policy, client_msg_id="m1"
            )
            await client.wait_terminal(first)
            if reply["type"] == "run_accepted":
                await client.wait_terminal(reply["run_id"])
            await client.close()

    expected = OUTCOME[given_policy or configured]
    first_end = terminal(client, first)
    if expected == "busy":
        assert (reply["type"], reply["code"], reply["client_msg_id"]) == ("error", "busy", "m1")
        assert first_end["type"] == "agent_completed"
    elif expected == "queued":
        assert reply["type"] == "run_accepted"
        assert first_end["type"] == "agent_completed"
        assert started_at(client, reply["run_id"]) - start == pytest.approx(10)
    else:
        assert reply["type"] == "run_accepted"
        assert (first_end["type"], first_end["data"]["reason"]) == (
            "agent_cancelled",
            "interrupted",
        )
        assert started_at(client, reply["run_id"]) == start
    if reply["type"] == "run_accepted":
        assert terminal(client, reply["run_id"])["type"] == "agent_completed"
    assert_threads_never_overlap(client)


async def test_in_process_start_run_raises_run_refused(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """In-process start_run refused by the policy or the queue limit raises RunRefused(code busy / limit_exceeded)."""
    config = make_config(max_queued_per_thread=1)
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            first = await runtime.start_run("alice", "sleep 5", thread_id="t")
            with pytest.raises(RunRefused) as busy:
                await runtime.start_run("alice", "hello", thread_id="t", policy="reject")
            second = await runtime.start_run("alice", "hello", thread_id="t")
            with pytest.raises(RunRefused) as full:
                await runtime.start_run("alice", "hello", thread_id="t")
            events = [await first.collect(), await second.collect()]
    assert busy.value.code == "busy"
    assert full.value.code == "limit_exceeded"
    frames = sorted((json.loads(e.frame) for run in events for e in run), key=lambda f: f["seq"])
    report = check_lifecycle(frames, first_seq=1)
    assert report.terminal_counts()["agent_completed"] == 2


# --- concurrency across threads ------------------------------------------------------------------


async def test_threads_run_concurrently_up_to_the_per_user_cap(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Different threads run concurrently up to max_active_runs_per_user; the rest wait and start in arrival order as slots free."""
    config = make_config(max_active_runs_per_user=2)
    plan = [("a", "sleep 5"), ("b", "sleep 10"), ("c", "sleep 1"), ("d", "sleep 1")]
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            runs = [
                await accepted(client, text, thread=thread, client_msg_id=thread)
                for thread, text in plan
            ]
            await trio.testing.wait_all_tasks_blocked()
            early = runtime.session_statistics("alice")
            for run_id in runs:
                await client.wait_terminal(run_id)
            await client.close()

    assert early is not None
    assert (early.active_runs, early.queued_runs) == (2, 2)
    starts = [started_at(client, r) - start for r in runs]
    ends = [ended_at(client, r) - start for r in runs]
    assert starts == pytest.approx([0, 0, 5, 6])
    assert ends == pytest.approx([5, 10, 6, 7])
    assert position(client, runs[0], "agent_completed") < position(client, runs[2], "agent_started")
    assert_threads_never_overlap(client)


# --- cancelling a queued run ---------------------------------------------------------------------


async def test_cancel_of_a_queued_run_is_a_lone_agent_cancelled(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """cancel of a queued run: only agent_cancelled (reason client) at once, no reply; the thread's other runs are unaffected."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config()) as runtime:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            active = await accepted(client, "sleep 5", thread="t", client_msg_id="m0")
            queued = await accepted(client, "sleep 1", thread="t", client_msg_id="m1")
            last = await accepted(client, "hello", thread="t", client_msg_id="m2")
            await client.send(type="cancel", run_id=queued, client_msg_id="c1")
            await client.wait_terminal(queued)
            cancelled_at = trio.current_time()
            await client.wait_terminal(last)
            await trio.testing.wait_all_tasks_blocked()
            await client.close()

    assert types(client, queued) == ["agent_cancelled"]
    assert terminal(client, queued)["data"]["reason"] == "client"
    assert cancelled_at == start
    assert not client.replies("error")
    assert terminal(client, active)["type"] == "agent_completed"
    assert ended_at(client, active) - start == pytest.approx(5)
    assert started_at(client, last) - start == pytest.approx(5)
    assert terminal(client, last)["type"] == "agent_completed"
    assert_threads_never_overlap(client)


# --- model-based property ------------------------------------------------------------------------

THREADS = ("a", "b")
POLICIES = (None, None, None, "enqueue", "reject", "interrupt")
#: Sleep lengths: fractions of .37 keep run ends off the whole seconds commands happen at.
DURATIONS = (None, 1.37, 2.37, 3.37, 4.37)


@attrs.frozen
class Send:
    thread: str
    policy: str | None
    duration: float | None  # None: a message that completes at once
    repeat: int = 1  # the same message, this many times in a row

    @property
    def text(self) -> str:
        return "hello" if self.duration is None else f"sleep {self.duration}"


@attrs.frozen
class Cancel:
    index: int  # of the accepted runs, modulo their number


@attrs.frozen
class Wait:
    seconds: int


Command = Send | Cancel | Wait

sends = st.builds(
    Send,
    st.sampled_from(THREADS),
    st.sampled_from(POLICIES),
    st.sampled_from(DURATIONS),
    st.integers(min_value=1, max_value=3),
)
#: Mostly sends, so that threads get busy and queues fill up.
commands = st.one_of(
    sends,
    sends,
    sends,
    st.builds(Cancel, st.integers(min_value=0, max_value=20)),
    st.builds(Wait, st.integers(min_value=1, max_value=3)),
)


@attrs.frozen
class Setup:
    policy: str
    max_active: int
    max_queued: int
    commands: tuple[Command, ...]


setups = st.builds(
    Setup,
    st.sampled_from(("enqueue", "enqueue", "reject", "interrupt")),
    st.integers(min_value=1, max_value=2),
    st.integers(min_value=1, max_value=2),
    st.lists(commands, min_size=3, max_size=16).map(tuple),
)


@attrs.define
class ModelRun:
    key: str  # the client_msg_id of its user_message
    thread: str
    duration: float | None
    start: float | None = None
    end: float | None = None
    terminal: str | None = None
    reason: str | None = None

    @property
    def lone(self) -> bool:
        return self.terminal is not None and self.start is None


@attrs.define
class Model:
    """What the agent actor should do, as a plain discrete-event simulation."""

    policy: str
    max_active: int
    max_queued: int
    now: float = 0.0
    pending: list[ModelRun] = attrs.field(factory=list)
    active: list[ModelRun] = attrs.field(factory=list)
    runs: list[ModelRun] = attrs.field(factory=list)  # accepted, in order
    replies: dict[str, str] = attrs.field(factory=dict)  # key -> "accepted" / error code

    def _finish(self, run: ModelRun, at: float, kind: str, reason: str | None = None) -> None:
        run.end, run.terminal, run.reason = at, kind, reason
        if run in self.active:
            self.active.remove(run)
        if run in self.pending:
            self.pending.remove(run)

    def _start_eligible(self) -> None:
        busy = {r.thread for r in self.active}
        for run in list(self.pending):
            if len(self.active) >= self.max_active:
                break
            if run.thread in busy:
                continue
            self.pending.remove(run)
            busy.add(run.thread)
            run.start = self.now
            self.active.append(run)

    def _ends(self, run: ModelRun) -> float:
        assert run.start is not None
        return run.start + (run.duration or 0.0)

    def advance(self, to: float) -> None:
        """Let runs end (and queued ones start) up to time ``to``."""
        while self.active:
            run = min(self.active, key=self._ends)
            if self._ends(run) > to:
                break
            self.now = self._ends(run)
            self._finish(run, self.now, "agent_completed")
            self._start_eligible()
        self.now = to

    def send(self, key: str, command: Send) -> None:
        policy = command.policy or self.policy
        running = [r for r in self.active if r.thread == command.thread]
        waiting = [r for r in self.pending if r.thread == command.thread]
        if running or waiting:
            if policy == "reject":
                self.replies[key] = "busy"
                return
            if policy == "interrupt":
                for run in running + waiting:
                    self._finish(run, self.now, "agent_cancelled", "interrupted")
            elif len(waiting) >= self.max_queued:
                self.replies[key] = "limit_exceeded"
                return
        run = ModelRun(key, command.thread, command.duration)
        self.replies[key] = "accepted"
        self.runs.append(run)
        self.pending.append(run)
        self._start_eligible()
        self.advance(self.now)  # runs that complete at once

    def cancel(self, key: str, run: ModelRun | None) -> None:
        if run is None or run.terminal is not None:
            self.replies[key] = "not_found"
            return
        self.replies[key] = "ok"
        self._finish(run, self.now, "agent_cancelled", "client")
        self._start_eligible()
        self.advance(self.now)


async def _policy_property(setup: Setup) -> None:
    config = Config(
        store="memory",
        write_linger=0.0,  # the model times deliveries exactly
        shutdown_grace=2.0,
        thread_policy=setup.policy,
        max_active_runs_per_user=setup.max_active,
        max_queued_per_thread=setup.max_queued,
        # Up to 48 frames may come at one instant; the rate limit is tested elsewhere.
        rate_limit=1000.0,
        rate_burst=1000,
    )
    model = Model(setup.policy, setup.max_active, setup.max_queued)
    replies: dict[str, str] = {}
    run_ids: dict[str, str] = {}  # key -> run_id
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await connect(nursery, runtime, "alice")
            start = trio.current_time()
            for index, command in enumerate(setup.commands):
                key = f"k{index}"
                match command:
                    case Send():
                        for repeat in range(command.repeat):
                            key = f"k{index}.{repeat}"
                            model.send(key, command)
                            reply = await send_message(
                                client,
                                command.text,
                                thread=command.thread,
                                policy=command.policy,
                                client_msg_id=key,
                            )
                            if reply["type"] == "run_accepted":
                                replies[key] = "accepted"
                                run_ids[key] = reply["run_id"]
                            else:
                                replies[key] = reply["code"]
                            await trio.testing.wait_all_tasks_blocked()
                    case Cancel(index=k):
                        target = model.runs[k % len(model.runs)] if model.runs else None
                        model.cancel(key, target)
                        run_id = run_ids[target.key] if target is not None else "run_unknown"
                        mark = len(client.frames)
                        await client.send(type="cancel", run_id=run_id, client_msg_id=key)
                        await trio.testing.wait_all_tasks_blocked()
                        errors = [
                            f
                            for f in client.frames[mark:]
                            if f["type"] == "error" and f.get("client_msg_id") == key
                        ]
                        replies[key] = errors[0]["code"] if errors else "ok"
                    case Wait(seconds=seconds):
                        await trio.sleep(seconds)
                        model.advance(trio.current_time() - start)
                await trio.testing.wait_all_tasks_blocked()
            for run_id in run_ids.values():
                await client.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            await client.close()
    model.advance(float("inf"))

    assert replies == model.replies
    report = check_lifecycle(client.frames)
    assert report.runs.keys() == set(run_ids.values())
    for run in model.runs:
        run_id = run_ids[run.key]
        events = client.run_events(run_id)
        times = client.run_event_times(run_id)
        last = events[-1]
        assert (last["type"], last["data"].get("reason")) == (run.terminal, run.reason), run
        if run.lone:
            assert [e["type"] for e in events] == ["agent_cancelled"], run
        else:
            assert events[0]["type"] == "agent_started", run
            assert times[0] - start == pytest.approx(run.start), run
        assert times[-1] - start == pytest.approx(run.end), run
    assert_threads_never_overlap(client)
    for run in model.runs:
        kind = "lone " if run.lone else ""
        hypothesis.event(f"{kind}{run.terminal} {run.reason or ''}".strip())
    for reply in set(replies.values()):
        hypothesis.event(f"reply: {reply}")


@given(setup=setups)
def test_thread_policies_follow_the_model(setup: Setup) -> None:
    """Random sends/cancels/waits: replies, each run's terminal, start and end times match a simple queue model; threads never overlap."""
    trio.run(_policy_property, setup, clock=trio.testing.MockClock(autojump_threshold=0))
