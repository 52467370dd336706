"""Leaving a Runtime is prompt and leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from netra_actors import Config, Runtime


async def test_closing_idle_sessions_takes_no_grace_period(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Closing a runtime whose sessions are idle does not wait out ``shutdown_grace``."""
    runtime = Runtime(make_config(shutdown_grace=30.0))
    async with runtime:
        for user in ("alice", "bob"):
            await (await runtime.start_run(user, "what is 1+1?")).collect()
        started = trio.current_time()
    assert trio.current_time() - started < 1.0
    assert runtime.statistics().sessions == 0


async def test_closing_with_an_active_run_waits_only_for_that_run(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """An active run is cancelled at shutdown and the runtime closes as soon as it has ended."""
    runtime = Runtime(make_config(shutdown_grace=30.0))
    async with runtime:
        handle = await runtime.start_run("alice", "sleep 100")
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
    assert trio.current_time() - started < 1.0
    events = [e.type for e in await handle.collect()]
    assert events[-2:] == ["tool_completed", "agent_cancelled"]
