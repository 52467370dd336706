"""Session-level properties: random agent scripts with faults, random client behaviour and
several users at once, on in-memory transports under virtual time.

Faults are drawn into the scripts (tools that raise or time out, a model that fails,
an agent that crashes at a drawn step); clients cancel at any point, drop and resume,
keep 1-3 tabs (some reading slowly, some opening late) and send messages while runs
are active under every thread policy. ``RecordingStore`` keeps the server's side of
each stream (every event and when it was stamped) to compare the clients with.

Each example is one ``trio.run`` with ``MockClock(autojump_threshold=0)``: timeouts,
pauses and the idle grace cost no real time, and (trio's scheduler being seeded by
hypothesis) a failure shrinks and replays deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import hypothesis
import trio
import trio.testing
from hypothesis import given
from strategies import (
    AfterEvents,
    AgentScript,
    CancelCommand,
    ConnectCommand,
    DisconnectCommand,
    DropTab,
    Frame,
    ModelRun,
    Pause,
    Program,
    RecordingStore,
    Scenario,
    ScriptBook,
    SendCommand,
    SendMessage,
    SessionModel,
    Settle,
    Tab,
    TabSegment,
    Trigger,
    UserPlan,
    WaitCommand,
    check_joined_stream,
    check_scripted_run,
    check_thread_order,
    expected_admission,
    of_type,
    scenarios,
    script_runtime,
    session_programs,
    stream_start,
)

from netra_actors import Config, Runtime
from netra_actors.testing import TERMINAL_EVENTS, check_lifecycle

#: Virtual seconds; far more than any example needs.
BOUND = 900
#: The scenarios' idle grace: longer than any pause with no connection open (3 s).
IDLE_GRACE = 20.0
#: The model test's idle grace: its waits (1-5 s) and runs (up to ~15 s) cross it.
MODEL_IDLE_GRACE = 4.0


def run_virtual(fn: Any, *args: Any) -> None:
    trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def thread_config(policy: str, max_active: int, max_queued: int, idle_grace: float) -> Config:
    return Config(
        store="memory",
        write_linger=0.0,  # the model times deliveries exactly
        shutdown_grace=2.0,
        thread_policy=policy,
        max_active_runs_per_user=max_active,
        max_queued_per_thread=max_queued,
        idle_session_grace=idle_grace,
        # Many frames may come at one instant; the rate limit is tested elsewhere.
        rate_limit=1000.0,
        rate_burst=1000,
    )


def terminal_label(events: Sequence[Mapping[str, Any]]) -> str:
    last = events[-1]
    detail = last["data"].get("reason") or last["data"].get("error", {}).get("type") or ""
    lone = "lone " if len(events) == 1 else ""
    return f"{lone}{last['type']} {detail}".strip()


def check_statistics_all_gone(runtime_stats: Any, sessions: Sequence[Any]) -> None:
    """Nothing remains: no session, connection, run or root task; no subscription anywhere."""
    assert runtime_stats.sessions == 0, runtime_stats
    assert runtime_stats.connections == 0, runtime_stats
    assert (runtime_stats.active_runs, runtime_stats.queued_runs) == (0, 0), runtime_stats
    assert runtime_stats.tasks == 0, runtime_stats
    for stats in sessions:
        assert stats.subscriptions == 0, stats
        assert (stats.connections, stats.active_runs, stats.queued_runs) == (0, 0, 0), stats


# --- several users, faults and client behaviour ------------------------------------------------


@attrs.define
class Sent:
    """One ``user_message`` a user sent, and what came of it."""

    key: str
    thread: str
    policy: str  # the policy in force for it (its own, else the configured one)
    script: AgentScript
    settled: bool  # sent with the runtime at rest: the reply is known exactly
    reply: str = ""  # "accepted" or the error code
    run_id: str | None = None
    expected: str | None = None  # the exact reply, when settled
    interrupts: list[str] = attrs.field(factory=list)  # runs it must interrupt, when settled
    cancel: str = "unsent"  # "ok" (no error: queued or active), "not_found", or "unsent"


@attrs.define
class User:
    name: str
    plan: UserPlan
    tabs: list[Tab]  # in plan order
    joined: list[Tab] = attrs.field(factory=list)  # in the order they opened
    sent: list[Sent] = attrs.field(factory=list)

    @property
    def accepted(self) -> list[Sent]:
        return [s for s in self.sent if s.run_id is not None]


async def _wait_trigger(when: Trigger, tab: Tab, user: User, store: RecordingStore) -> None:
    match when:
        case Settle():
            # A message settles again with its tab's lock held (see _send).
            await trio.testing.wait_all_tasks_blocked()
        case Pause(seconds=seconds):
            await trio.sleep(seconds)
        case AfterEvents(run=index, count=count):
            runs = [s.run_id for s in user.accepted]
            if runs:
                run_id = runs[index % len(runs)]
                assert run_id is not None
                await tab.wait_until(lambda: tab.has_passed(run_id, count, store))


async def _cancel_later(tab: Tab, sent: Sent, store: RecordingStore) -> None:
    """Cancel the run once the tab has its ``cancel_after``-th event (or its terminal)."""
    run_id, count = sent.run_id, sent.script.cancel_after
    assert run_id is not None
    assert count is not None
    await tab.wait_until(lambda: tab.has_passed(run_id, count, store))
    code = await tab.cancel(run_id, f"{sent.key}.cancel")
    sent.cancel = "ok" if code is None else code


async def _send(
    runtime: Runtime,
    book: ScriptBook,
    store: RecordingStore,
    cancellers: trio.Nursery,
    user: User,
    tab: Tab,
    action: SendMessage,
) -> None:
    config = runtime.config
    sent = Sent(
        key=f"{user.name}.m{len(user.sent)}",
        thread=action.thread,
        policy=action.policy or config.thread_policy,
        script=action.script,
        settled=isinstance(action.when, Settle),
    )
    text = book.add(sent.key, action.script)

    async def settle_and_predict() -> None:
        # With the tab's lock held (a cancel in flight on it cannot delay the send), wait
        # until nothing can move at this instant: the thread's state is then the stream's.
        await trio.testing.wait_all_tasks_blocked()
        session = runtime.manager.session_for(user.name)
        assert session is not None
        thread_runs = [s.run_id for s in user.accepted if s.thread == sent.thread]
        sent.expected, sent.interrupts = expected_admission(
            store.frames(session.session_id),
            [r for r in thread_runs if r is not None],
            sent.policy,
            config.max_queued_per_thread,
        )

    user.sent.append(sent)
    reply = await tab.user_message(
        sent.key,
        text,
        thread=action.thread,
        policy=action.policy,
        prepare=settle_and_predict if sent.settled else None,
    )
    if reply["type"] == "run_accepted":
        assert reply["thread_id"] == action.thread
        sent.reply, sent.run_id = "accepted", str(reply["run_id"])
        if action.script.cancel_after is not None:
            cancellers.start_soon(_cancel_later, tab, sent, store)
    else:
        sent.reply = str(reply["code"])


async def _user_flow(
    runtime: Runtime,
    nursery: trio.Nursery,
    book: ScriptBook,
    store: RecordingStore,
    user: User,
) -> None:
    """Play the user's actions one after another (cancels run alongside), then let every
    run end, let every tab receive everything, and close the tabs."""
    actions = user.plan.actions
    async with trio.open_nursery() as cancellers:
        for index in range(len(actions) + 1):
            for tab, tab_plan in zip(user.tabs, user.plan.tabs, strict=True):
                if tab_plan.join_at == index:
                    await tab.open(nursery, runtime)
                    user.joined.append(tab)
            if index == len(actions):
                break
            action = actions[index]
            tab = user.joined[action.tab % len(user.joined)]
            await _wait_trigger(action.when, tab, user, store)
            match action:
                case SendMessage():
                    await _send(runtime, book, store, cancellers, user, tab, action)
                case DropTab(pause=pause):
                    await tab.drop_and_resume(nursery, runtime, pause)
    # The first tab (open from the start) sees every run end; then the stream is complete
    # and every tab must catch up with it.
    first = user.joined[0]
    run_ids = [s.run_id for s in user.accepted]
    await first.wait_until(lambda: all(first.has_ended(r) for r in run_ids if r))
    last_seq = store.last_seq(first.session_id)
    for tab in user.joined:
        await tab.wait_until(lambda tab=tab: tab.last_seq == last_seq)
    for tab in user.joined:
        await tab.close()


async def _scenario(scenario: Scenario) -> None:
    book, store = ScriptBook(), RecordingStore()
    config = thread_config(scenario.policy, scenario.max_active, scenario.max_queued, IDLE_GRACE)
    users = [
        User(
            f"u{i}",
            plan,
            [
                Tab(
                    f"u{i}",
                    read_delay=t.read_delay,
                    capacity=t.capacity,
                    name=f"u{i}.t{j}",
                    batch=t.batch,
                )
                for j, t in enumerate(plan.tabs)
            ],
        )
        for i, plan in enumerate(scenario.users)
    ]
    with trio.fail_after(BOUND):
        async with (
            trio.open_nursery() as nursery,
            script_runtime(book, config, store=store) as runtime,
        ):
            async with trio.open_nursery() as flows:
                for user in users:
                    flows.start_soon(_user_flow, runtime, nursery, book, store, user)
            # Every run has ended and every tab is closed; the sessions idle out.
            await trio.sleep(IDLE_GRACE + 0.5)
            await trio.testing.wait_all_tasks_blocked()
            final = runtime.statistics()
            captured = {id(s): s for u in users for t in u.joined for s in t.sessions}
            session_stats = [s.statistics() for s in captured.values()]

    # 5. Nothing remains once idle_session_grace has passed.
    check_statistics_all_gone(final, session_stats)
    assert len(captured) == len(users)

    all_runs: set[str] = set()
    for user in users:
        check_user(user, store)
        runs = {s.run_id for s in user.accepted}
        assert not runs & all_runs, "a run id was given to two users"
        all_runs |= {r for r in runs if r}
    hypothesis.event(f"users: {len(users)}")
    # Steer generation toward refusals, interruptions and cancels.
    sent = [s for user in users for s in user.sent]
    hypothesis.target(
        sum(s.reply != "accepted" or s.cancel == "ok" or bool(s.interrupts) for s in sent),
        label="refused, cancelled or interrupting messages",
    )


def check_user(user: User, store: RecordingStore) -> None:
    """Properties 1-4 for one user, against the server's side of the user's stream."""
    session_ids = {seg.session_id for tab in user.joined for seg in tab.segments}
    assert len(session_ids) == 1, f"{user.name} saw several sessions: {session_ids}"
    (session_id,) = session_ids
    stream = store.frames(session_id)
    check_lifecycle(stream, first_seq=1)
    check_every_connection_lifecycle(user, stream)  # 1
    check_every_tab_sees_the_same_stream(user, stream)  # 2
    check_only_own_events(user, stream)  # 3
    check_outcomes_agree_with_the_draw(user, stream)  # 4
    for tab in user.tabs:
        if tab.batch > 1:
            hypothesis.event(f"tab with batch: got multi-event frames {tab.multi_frames > 0}")


def check_every_connection_lifecycle(user: User, stream: Sequence[Frame]) -> None:
    """1. The grammar holds on each connection's piece and each tab's de-duplicated stream
    (for a tab that joined late, from its session_ready.last_seq on)."""
    for tab, tab_plan in zip(user.tabs, user.plan.tabs, strict=True):
        for segment in tab.segments:
            check_segment(segment, user.name, stream)
        if tab.segments:
            first = tab.segments[0]
            if tab_plan.join_at == 0:
                assert stream_start(first.ready) == 0, first.ready
            check_joined_stream(first.ready, tab.events, stream)
            hypothesis.event(
                f"tab: {'late' if tab_plan.join_at else 'first'}"
                f"{', slow' if tab.read_delay else ''}"
                f"{', resumed' if len(tab.segments) > 1 else ''}"
            )


def check_segment(segment: TabSegment, user_id: str, stream: Sequence[Frame]) -> None:
    """One connection: its session_ready, an exact resume (no resume_gap), a gap-free piece
    of the session's stream, closed by the client."""
    ready = segment.ready
    assert ready["user_id"] == user_id
    assert not segment.replies("resume_gap"), segment.frames[:3]
    if segment.after_seq is not None:
        assert ready["after_seq"] == segment.after_seq, (ready, segment.after_seq)
    assert segment.close_code == 1000, segment.close_code
    check_joined_stream(ready, segment.events, stream, complete=False)


def check_every_tab_sees_the_same_stream(user: User, stream: Sequence[Frame]) -> None:
    """2. Tabs open from the start and never dropped received the very same event frames,
    the session's whole stream; every tab's de-duplicated events (over its resumes) are the
    stream from where it joined."""
    for tab, tab_plan in zip(user.tabs, user.plan.tabs, strict=True):
        if not tab.segments:
            continue
        start = stream_start(tab.segments[0].ready)
        assert tab.events == stream[start:], f"{tab.name} did not receive the session's stream"
        if tab_plan.join_at == 0 and len(tab.segments) == 1:
            assert tab.segments[0].events == stream, f"{tab.name} differs from the stream"


def check_only_own_events(user: User, stream: Sequence[Frame]) -> None:
    """3. Every event a tab of the user received is of a run the user's run_accepted frames
    named, and every agent_started names the user."""
    run_ids = {s.run_id for s in user.accepted}
    assert set(check_lifecycle(stream).runs) == run_ids
    for tab in user.joined:
        for segment in tab.segments:
            assert {f["run_id"] for f in segment.events} <= run_ids
            for started in of_type(segment.events, "agent_started"):
                assert started["data"]["user_id"] == user.name, started


def check_outcomes_agree_with_the_draw(user: User, stream: Sequence[Frame]) -> None:
    """4. Replies follow the policy (exactly, for messages sent at rest); refused messages
    make no run; a thread's runs start in acceptance order, each after the earlier ones
    ended; every run is its script, ending as its fault says unless a cancel answered
    without error (reason client) or an interrupt (reason interrupted) ended it first."""
    accepted = user.accepted
    check_thread_order(stream, [(s.run_id, s.thread) for s in accepted if s.run_id])
    must_interrupt = {r for s in accepted for r in s.interrupts}
    started = of_type(stream, "agent_started")
    for index, sent in enumerate(user.sent):
        hypothesis.event(
            f"reply: {sent.reply} ({sent.policy}{', at rest' if sent.settled else ''})"
        )
        assert sent.reply in ("accepted", "busy", "limit_exceeded"), sent
        if sent.expected is not None:
            assert sent.reply == sent.expected, sent
        if sent.reply == "busy":
            assert sent.policy == "reject", sent
        if sent.reply == "limit_exceeded":
            assert sent.policy == "enqueue", sent
        if sent.run_id is None:
            assert all(f["data"].get("client_msg_id") != sent.key for f in started), sent
            continue
        events = [f for f in stream if f["run_id"] == sent.run_id]
        interruptible = any(
            later.run_id is not None and later.thread == sent.thread and later.policy == "interrupt"
            for later in user.sent[index + 1 :]
        )
        reasons = {"client"} if sent.cancel == "ok" else set()
        if interruptible:
            reasons.add("interrupted")
        cancelled: bool | None
        if sent.run_id in must_interrupt:
            cancelled, reasons = True, {"interrupted"}
        elif sent.cancel == "ok":
            cancelled = True
        else:
            cancelled = None if reasons else False
        check_scripted_run(
            sent.script,
            events,
            cancelled=cancelled,
            reasons=reasons,
            cancel_sent_at=sent.script.cancel_after if reasons == {"client"} else None,
        )
        hypothesis.event(f"run: {terminal_label(events)}")


@given(scenario=scenarios())
def test_several_users_with_faults_tabs_and_resumes(scenario: Scenario) -> None:
    """1-4 users at once, faulty scripts, cancels, drops/resumes, slow and late tabs: lifecycle, same stream on every tab, isolation, fault outcomes, nothing left."""
    run_virtual(_scenario, scenario)


# --- one session against a reference model -----------------------------------------------------


@attrs.define
class Opened:
    """One connection of the model test, and what it must have received."""

    tab: Tab
    segment: TabSegment
    session: int  # the model's session number
    session_id: str
    at_open: int  # events of the session when it opened
    gap: bool  # a resume into another session: resume_gap expected
    at_close: int | None = None


@attrs.define
class ModelTest:
    """The system side of the model-based test (one user, ``alice``)."""

    runtime: Runtime
    nursery: trio.Nursery
    store: RecordingStore
    model: SessionModel
    open_tabs: list[Tab] = attrs.field(factory=list)
    closed_tabs: list[Tab] = attrs.field(factory=list)
    connections: list[Opened] = attrs.field(factory=list)
    session_ids: dict[int, str] = attrs.field(factory=dict)  # model session -> session_id
    tab_sessions: dict[int, int] = attrs.field(factory=dict)  # id(tab) -> its last session
    replies: dict[str, str] = attrs.field(factory=dict)
    run_ids: dict[str, str] = attrs.field(factory=dict)  # key -> run_id
    #: The situations messages met on a busy thread (for statistics and targeting).
    busy_sends: list[str] = attrs.field(factory=list)
    scripts: dict[str, AgentScript] = attrs.field(factory=dict)

    async def connect(self, resume: bool) -> Tab:
        reopen = resume and bool(self.closed_tabs)
        tab = self.closed_tabs.pop() if reopen else Tab("alice", name=f"t{len(self.connections)}")
        new = self.model.connect()
        segment = await tab.open(self.nursery, self.runtime, resume=reopen)
        if new:
            assert segment.session_id not in self.session_ids.values(), "an old session came back"
            self.session_ids[self.model.session] = segment.session_id
        assert segment.session_id == self.session_ids[self.model.session]
        gap = reopen and self.tab_sessions[id(tab)] != self.model.session
        self.tab_sessions[id(tab)] = self.model.session
        self.connections.append(
            Opened(
                tab,
                segment,
                self.model.session,
                segment.session_id,
                self.store.last_seq(segment.session_id),
                gap,
            )
        )
        self.open_tabs.append(tab)
        return tab

    async def any_tab(self, index: int) -> Tab:
        if not self.open_tabs:
            return await self.connect(False)
        return self.open_tabs[index % len(self.open_tabs)]

    async def disconnect(self, index: int) -> None:
        tab = self.open_tabs.pop(index % len(self.open_tabs))
        opened = next(c for c in reversed(self.connections) if c.tab is tab)
        opened.at_close = self.store.last_seq(opened.session_id)
        await tab.close()
        self.model.disconnect()
        self.closed_tabs.append(tab)

    async def settle_and_compare(self) -> None:
        """Let everything happen that happens at this instant; the system must be the model."""
        await trio.testing.wait_all_tasks_blocked()
        model = self.model
        model.advance(trio.current_time())
        stats = self.runtime.statistics()
        assert stats.sessions == int(model.alive), (stats, model)
        if model.alive:
            session = self.runtime.session_statistics("alice")
            assert session is not None
            assert session.session_id == self.session_ids[model.session]
            got = (session.connections, session.active_runs, session.queued_runs)
            assert got == (model.tabs, len(model.active), len(model.pending)), (got, model)

    async def play(self, index: int, command: Any) -> None:
        key = f"k{index}"
        model = self.model
        match command:
            case SendCommand(thread=thread, policies=policies, script=script, tab=which):
                tab = await self.any_tab(which)
                for repeat, policy in enumerate(policies):
                    if repeat:
                        await self.settle_and_compare()
                    key = f"k{index}.{repeat}"
                    self.scripts[key] = script
                    running = any(r.thread == thread for r in model.active)
                    queued = any(r.thread == thread for r in model.pending)
                    if running or queued:
                        self.busy_sends.append(
                            f"{policy or model.policy} on a thread with"
                            f" {'an active run' if running else 'no active run'}"
                            f"{' and queued runs' if queued else ''}"
                        )
                    model.send(
                        key,
                        thread,
                        policy,
                        duration=script.expected_duration(),
                        natural=script.expected_terminal(),
                    )
                    reply = await tab.user_message(
                        key, f"script k{index}", thread=thread, policy=policy
                    )
                    if reply["type"] == "run_accepted":
                        self.replies[key] = "accepted"
                        self.run_ids[key] = str(reply["run_id"])
                    else:
                        self.replies[key] = str(reply["code"])
            case CancelCommand(back=back, tab=which):
                tab = await self.any_tab(which)
                target = model.runs[-1 - back % len(model.runs)] if model.runs else None
                model.cancel(key, target)
                run_id = self.run_ids[target.key] if target is not None else "run_unknown"
                code = await tab.cancel(run_id, key)
                self.replies[key] = code or "ok"
            case ConnectCommand(resume=resume):
                await self.connect(resume)
            case DisconnectCommand(tab=which, every_tab=every_tab):
                while self.open_tabs:
                    await self.disconnect(which)
                    if not every_tab:
                        break
            case WaitCommand(seconds=seconds):
                await trio.sleep(seconds)


async def _model_program(program: Program, book: ScriptBook) -> ModelTest:
    store = RecordingStore()
    config = thread_config(program.policy, program.max_active, program.max_queued, MODEL_IDLE_GRACE)
    model = SessionModel(program.policy, program.max_active, program.max_queued, MODEL_IDLE_GRACE)
    with trio.fail_after(BOUND):
        async with (
            trio.open_nursery() as nursery,
            script_runtime(book, config, store=store) as runtime,
        ):
            assert trio.current_time() == 0.0
            test = ModelTest(runtime, nursery, store, model)
            for index, command in enumerate(program.commands):
                if isinstance(command, SendCommand):
                    book.add(f"k{index}", command.script)
                await test.play(index, command)
                await test.settle_and_compare()
            while test.open_tabs:
                await test.disconnect(0)
            await test.settle_and_compare()
            # Let the runs end one by one (the model says when), then the session idle out.
            while model.active:
                next_end = min(r.start + r.duration for r in model.active if r.start is not None)
                await trio.sleep(next_end - trio.current_time())
                await test.settle_and_compare()
            assert not model.pending
            await trio.sleep(MODEL_IDLE_GRACE)
            await test.settle_and_compare()
            final = runtime.statistics()
            captured = {id(s): s for c in test.connections for s in c.tab.sessions}
            session_stats = [s.statistics() for s in captured.values()]
    assert not model.alive
    check_statistics_all_gone(final, session_stats)
    return test


def check_against_model(test: ModelTest) -> None:
    model = test.model
    store = test.store
    # Which messages were accepted or refused (and with which code), which cancels found a run.
    assert test.replies == model.replies
    assert set(test.run_ids) == {r.key for r in model.runs}

    # Each run: how and when it started and ended, and its events against its script.
    for run in model.runs:
        check_model_run(run, test.run_ids[run.key], test.scripts[run.key], test, store)

    # Each session's stream: lifecycle, no other run, runs of a thread one after another
    # in the order they were accepted.
    for number, session_id in test.session_ids.items():
        stream = store.frames(session_id)
        report = check_lifecycle(stream, first_seq=1)
        runs = [r for r in model.runs if r.session == number]
        assert set(report.runs) == {test.run_ids[r.key] for r in runs}
        check_thread_order(stream, [(test.run_ids[r.key], r.thread) for r in runs])

    # Each connection received exactly the events of its session from where it started
    # (its session_ready, or after_seq when resumed) to when it closed.
    for opened in test.connections:
        ready = opened.segment.ready
        stream = store.frames(opened.session_id)
        assert ready["session_id"] == opened.session_id
        assert ready["last_seq"] == opened.at_open, (ready, opened.at_open)
        gaps = opened.segment.replies("resume_gap")
        if opened.gap:
            assert gaps == [
                {
                    "type": "resume_gap",
                    "session_id": opened.session_id,
                    "oldest_seq": 1,  # the window keeps every event here
                    "last_seq": opened.at_open,
                }
            ], opened.segment.frames[:3]
            assert ready["after_seq"] == 0
            hypothesis.event("resume into a new session: resume_gap")
        else:
            assert not gaps, gaps
            if opened.segment.after_seq is not None:
                assert ready["after_seq"] == opened.segment.after_seq
                hypothesis.event("exact resume")
        assert opened.at_close is not None
        start = stream_start(ready)
        assert opened.segment.events == stream[start : opened.at_close], opened
        check_joined_stream(ready, opened.segment.events, stream, complete=False)
    hypothesis.event(f"sessions: {len(test.session_ids)}")
    for situation in set(test.busy_sends):
        hypothesis.event(situation)
    hypothesis.target(len(test.session_ids), label="sessions")
    hypothesis.target(
        sum("queued" in situation for situation in test.busy_sends),
        label="messages on a thread with queued runs",
    )
    hypothesis.target(
        sum(reply not in ("accepted", "not_found") for reply in test.replies.values()),
        label="refusals and cancels that hit a run",
    )
    for reply in sorted(set(test.replies.values())):
        hypothesis.event(f"reply: {reply}")


def check_model_run(
    run: ModelRun, run_id: str, script: AgentScript, test: ModelTest, store: RecordingStore
) -> None:
    session_id = test.session_ids[run.session]
    events = [f for f in store.frames(session_id) if f["run_id"] == run_id]
    times = store.run_times(session_id, run_id)
    assert events, run
    last = events[-1]
    assert last["type"] in TERMINAL_EVENTS
    detail = last["data"].get("reason") or last["data"].get("error", {}).get("type")
    assert (last["type"], detail) == (run.terminal, run.detail), (run, events)
    if run.lone:
        assert [e["type"] for e in events] == ["agent_cancelled"], run
    else:
        assert events[0]["type"] == "agent_started", run
        assert run.start is not None
        assert math.isclose(times[0], run.start, abs_tol=1e-9), (times[0], run)
    assert run.end is not None
    assert math.isclose(times[-1], run.end, abs_tol=1e-9), (times[-1], run)
    cancelled = run.terminal == "agent_cancelled"
    check_scripted_run(
        script,
        events,
        cancelled=cancelled,
        reasons=(run.detail,) if cancelled and run.detail else (),
    )
    hypothesis.event(f"run: {terminal_label(events)}")


@given(program=session_programs())
def test_one_session_follows_the_model(program: Program) -> None:
    """Random messages (faulty scripts, any policy), cancels, tab opens/closes/resumes and waits against one session: replies, terminals, times, statistics and streams match a reference model."""
    book = ScriptBook()
    holder: list[ModelTest] = []

    async def main() -> None:
        holder.append(await _model_program(program, book))

    run_virtual(main)
    check_against_model(holder[0])
