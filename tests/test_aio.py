"""The runtime as a Trio guest of asyncio: runs, calls, errors and cancellation across the loops.

Each test is a sync test that calls ``asyncio.run`` (pytest-trio owns async tests), with the
real clock and an overall ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import trio

from netra_actors import (
    ChatMessage,
    ChatRequest,
    Config,
    Event,
    RuntimeClosed,
    ScriptedLLMProvider,
    ScriptedTurn,
    TextDelta,
    ToolCall,
    ToolRegistry,
    tool_calling_agent,
)
from netra_actors._agents import demo_tools
from netra_actors.aio import (
    AsyncioBridge,
    AsyncioRuntime,
    asyncio_agent,
    asyncio_tool,
    run_asyncio,
)
from netra_actors.testing import check_lifecycle

TIMEOUT = 20.0

MakeConfig = Callable[..., Config]


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """``asyncio.run(main())`` bounded by ``TIMEOUT`` seconds."""

    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await main()

    return asyncio.run(bounded())


def checked(events: list[Event]) -> None:
    """The events form one well-formed run stream (``check_lifecycle`` raises otherwise)."""
    report = check_lifecycle([event.frame for event in events])
    assert report.events == len(events)
    assert len(report.runs) == 1


async def until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll ``predicate`` on the asyncio side until it holds (real clock)."""
    for _ in range(int(limit / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"still false after {limit} s")


def subscriptions(rt: AsyncioRuntime, user_id: str) -> int:
    stats = rt.runtime.session_statistics(user_id)
    assert stats is not None
    return stats.subscriptions


def test_calculator_run_streams_events_to_asyncio(make_config: MakeConfig) -> None:
    """A demo run started from asyncio yields its whole, well-formed event stream, ending at
    its terminal event, on the asyncio loop's own thread."""

    async def main() -> list[Event]:
        async with AsyncioRuntime(make_config()) as rt:
            handle = await rt.start_run("alice", "what is 2+3*4?")
            return await handle.collect()

    events = run(main)
    checked(events)
    assert events[0].type == "agent_started"
    assert events[-1].type == "agent_completed"
    assert "14" in events[-1].data["final_response"]
    assert {"tool_executing", "tool_completed"} <= {e.type for e in events}


def test_stream_many_events_with_a_slow_consumer(make_config: MakeConfig) -> None:
    """More events than the bridge buffers all arrive, in order, to a consumer that yields
    to the loop between events (the Trio reader waits for it)."""

    async def main() -> list[Event]:
        async with AsyncioRuntime(make_config()) as rt:
            handle = await rt.start_run("bob", "stream 300")
            received = []
            async for event in handle.events():
                received.append(event)
                await asyncio.sleep(0)
            return received

    events = run(main)
    checked(events)
    assert sum(e.type == "partial_result" for e in events) == 300
    assert [e.seq for e in events] == sorted(e.seq for e in events)


def test_cancel_a_long_tool_from_asyncio(make_config: MakeConfig) -> None:
    """``handle.cancel()`` from asyncio cancels the run: the sleeping tool is reported
    cancelled and the iteration ends after ``agent_cancelled``."""

    async def main() -> list[Event]:
        async with AsyncioRuntime(make_config()) as rt:
            handle = await rt.start_run("carol", "sleep 30")
            received = []
            async for event in handle.events():
                received.append(event)
                if event.type == "tool_executing":
                    outcome = await handle.cancel()
                    assert outcome.state == "active"
            return received

    events = run(main)
    checked(events)
    assert events[-1].type == "agent_cancelled"
    completed = [e for e in events if e.type == "tool_completed"]
    assert completed[0].data["status"] == "cancelled"


def test_cancel_run_by_id(make_config: MakeConfig) -> None:
    """``rt.cancel_run`` cancels by run id; an unknown id is ``not_found``."""

    async def main() -> list[Event]:
        async with AsyncioRuntime(make_config()) as rt:
            handle = await rt.start_run("dave", "sleep 30")
            assert (await rt.cancel_run("dave", "no-such-run")).state == "not_found"
            assert (await rt.cancel_run("dave", handle.run_id)).state in {"queued", "active"}
            return await handle.collect()

    events = run(main)
    assert events[-1].type == "agent_cancelled"


def test_cancelling_the_consumer_stops_reading_but_not_the_run(make_config: MakeConfig) -> None:
    """An asyncio task cancelled while iterating closes the handle's subscription; the run
    goes on and completes."""

    async def main() -> None:
        async with AsyncioRuntime(make_config()) as rt:
            handle = await rt.start_run("erin", "sleep 0.3")
            started = asyncio.Event()

            async def consume() -> None:
                async for event in handle.events():
                    if event.type == "tool_executing":
                        started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            assert subscriptions(rt, "erin") == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: subscriptions(rt, "erin") == 0)
            state = rt.runtime.run_state(handle.run_id)
            assert state is not None
            assert state.state in {"queued", "running"}
            await until(lambda: rt.statistics().active_runs == 0)
            finished = rt.runtime.run_state(handle.run_id)
            assert finished is not None
            assert finished.state == "completed"

    run(main)


def test_breaking_out_of_the_iteration_closes_the_subscription(make_config: MakeConfig) -> None:
    """Leaving an ``aclosing`` iteration early stops reading at once."""

    async def main() -> None:
        async with AsyncioRuntime(make_config()) as rt:
            handle = await rt.start_run("fay", "sleep 30")
            async with contextlib.aclosing(handle.events()) as events:
                async for event in events:
                    if event.type == "tool_executing":
                        break
            await until(lambda: subscriptions(rt, "fay") == 0)
            await handle.cancel()

    run(main)


def test_call_returns_results_and_raises_trio_errors(make_config: MakeConfig) -> None:
    """``call`` returns a Trio function's result and raises its exception in asyncio."""

    async def add(a: int, b: int) -> int:
        await trio.sleep(0.01)
        return a + b

    async def explode() -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError("from trio")

    async def main() -> None:
        async with AsyncioRuntime(make_config()) as rt:
            assert await rt.call(add, 2, 3) == 5
            with pytest.raises(ValueError, match="from trio"):
                await rt.call(explode)
            # The runtime survives a failed call.
            assert await rt.call(add, 1, 1) == 2

    run(main)


def test_cancelling_a_call_cancels_the_trio_task(make_config: MakeConfig) -> None:
    """Cancelling the asyncio caller cancels the Trio task and waits until it has ended."""
    trio_side: list[str] = []

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        finally:
            trio_side.append("cancelled")

    async def main() -> None:
        async with AsyncioRuntime(make_config()) as rt:
            task = asyncio.create_task(rt.call(forever))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert trio_side == ["cancelled"]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await rt.call(forever)
            assert trio_side == ["cancelled", "cancelled"]

    run(main)


def test_graceful_exit_cancels_runs_and_ends_iterations(make_config: MakeConfig) -> None:
    """Leaving the block shuts down gracefully: a reader still iterating receives the run's
    ``agent_cancelled`` (reason ``shutdown``); pending calls fail with ``RuntimeClosed``."""
    received: list[Event] = []
    outcomes: list[BaseException] = []

    async def main() -> None:
        async with AsyncioRuntime(make_config()) as rt:
            handle = await rt.start_run("gus", "sleep 30")
            started = asyncio.Event()

            async def consume() -> None:
                async for event in handle.events():
                    received.append(event)
                    if event.type == "tool_executing":
                        started.set()

            async def pending() -> None:
                try:
                    await rt.call(trio.sleep_forever)
                except RuntimeClosed as exc:
                    outcomes.append(exc)

            consumer = asyncio.create_task(consume())
            waiter = asyncio.create_task(pending())
            await started.wait()
        await consumer
        await waiter
        with pytest.raises(RuntimeClosed):
            await rt.call(trio.sleep, 0)

    run(main)
    assert received[-1].type == "agent_cancelled"
    assert received[-1].data["reason"] == "shutdown"
    checked(received)
    assert len(outcomes) == 1


def test_cancelling_the_owner_cancels_the_trio_side(make_config: MakeConfig) -> None:
    """Cancelling the task that owns the ``async with`` cancels the Trio side at once and
    still waits for the guest run to finish before ``CancelledError`` propagates."""
    trio_side: list[str] = []

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        finally:
            trio_side.append("cancelled")

    async def main() -> None:
        entered = asyncio.Event()
        runtime = AsyncioRuntime(make_config())
        calls: list[asyncio.Task[None]] = []

        async def owner() -> None:
            async with runtime as rt:
                calls.append(asyncio.create_task(rt.call(forever)))
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(owner())
        await entered.wait()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trio_side == ["cancelled"]
        # The pending call learns that the runtime stopped.
        with pytest.raises(RuntimeClosed):
            await calls[0]
        assert runtime.closing
        # The guest run is over, so a new one can start in this thread.
        async with AsyncioRuntime(make_config()) as again:
            assert await again.call(trio.sleep, 0) is None

    run(main)


def test_a_failing_start_is_raised_from_aenter(make_config: MakeConfig) -> None:
    """An error while the runtime starts is raised from ``__aenter__``."""

    async def main() -> None:
        with pytest.raises(TypeError, match="no_such_option"):
            async with AsyncioRuntime(make_config(), no_such_option=1):
                pass  # pragma: no cover
        # The failed guest run is over: another can start.
        async with AsyncioRuntime(make_config()) as rt:
            assert await rt.call(trio.sleep, 0) is None

    run(main)


def test_aclose_is_idempotent_and_one_guest_run_per_thread(make_config: MakeConfig) -> None:
    """A second runtime cannot start while one runs in this thread (the first is unharmed);
    ``aclose`` may be called before leaving the block."""

    async def main() -> None:
        async with AsyncioRuntime(make_config()) as rt:
            with pytest.raises(RuntimeError):
                async with AsyncioRuntime(make_config()):
                    pass  # pragma: no cover
            assert await rt.call(trio.sleep, 0) is None
            unread = await rt.start_run("lou", "sleep 30")
            await rt.aclose()
            assert rt.closing
            with pytest.raises(RuntimeClosed):
                await unread.collect()
            with pytest.raises(RuntimeClosed):
                await rt.start_run("lou", "hi")
        await rt.aclose()

    run(main)


def _tool_script(name: str, arguments: dict[str, Any]) -> ScriptedLLMProvider:
    """A model that calls ``name`` once, then answers with the tool's result."""

    def script(request: Any) -> ScriptedTurn:
        results = [m for m in request.messages if m.role == "tool"]
        if not results:
            return ScriptedTurn(tool_calls=(ToolCall(f"call_{name}", name, arguments),))
        return ScriptedTurn(answer=(f"result: {results[-1].content}",))

    return ScriptedLLMProvider(script)


def _asyncio_tool_runtime(make_config: MakeConfig, fn: Any, arguments: dict[str, Any]) -> Any:
    tool = asyncio_tool(fn)
    return AsyncioRuntime(
        make_config(),
        agents={"a": tool_calling_agent()},
        tools=ToolRegistry([tool]),
        llm=_tool_script(tool.name, arguments),
    )


def test_asyncio_tool_runs_on_the_asyncio_loop(make_config: MakeConfig) -> None:
    """A tool written for asyncio runs as an asyncio task; its result reaches the run."""
    seen: list[object] = []

    async def lookup(city: str) -> dict[str, Any]:
        """Look up a city.

        Args:
            city: The city's name.
        """
        seen.append(asyncio.current_task())
        await asyncio.sleep(0.01)
        return {"city": city, "population": 42}

    async def main() -> list[Event]:
        async with _asyncio_tool_runtime(make_config, lookup, {"city": "Oslo"}) as rt:
            assert rt.runtime.tools.get("lookup").parameters["required"] == ["city"]
            return await (await rt.start_run("hal", "population of Oslo?")).collect()

    events = run(main)
    checked(events)
    completed = next(e for e in events if e.type == "tool_completed")
    assert completed.data["status"] == "ok"
    assert completed.data["results"] == {"city": "Oslo", "population": 42}
    assert isinstance(seen[0], asyncio.Task)
    assert events[-1].type == "agent_completed"


def test_asyncio_tool_errors_become_tool_errors(make_config: MakeConfig) -> None:
    """An asyncio tool's exception is reported as the call's ``tool_error``."""

    async def broken() -> None:
        await asyncio.sleep(0)
        raise KeyError("missing")

    async def main() -> list[Event]:
        async with _asyncio_tool_runtime(make_config, broken, {}) as rt:
            return await (await rt.start_run("ivy", "go")).collect()

    events = run(main)
    completed = next(e for e in events if e.type == "tool_completed")
    assert completed.data["status"] == "error"
    assert completed.data["error"]["type"] == "tool_error"
    assert "KeyError" in completed.data["error"]["message"]


def test_cancelling_a_run_cancels_its_asyncio_tool(make_config: MakeConfig) -> None:
    """Cancelling the run cancels the asyncio task running its tool."""
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> list[Event]:
        async with _asyncio_tool_runtime(make_config, slow, {}) as rt:
            handle = await rt.start_run("jo", "go")
            received = []
            async for event in handle.events():
                received.append(event)
                if event.type == "tool_executing":
                    await handle.cancel()
            assert cancelled.is_set()
            return received

    events = run(main)
    assert events[-1].type == "agent_cancelled"
    completed = next(e for e in events if e.type == "tool_completed")
    assert completed.data["status"] == "cancelled"


def test_run_asyncio_needs_an_asyncio_host() -> None:
    """``run_asyncio`` under plain ``trio.run`` raises (no asyncio loop to run on)."""

    async def job() -> int:
        return 1  # pragma: no cover

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await run_asyncio(job)

    trio.run(main)


def test_asyncio_tool_under_plain_trio_is_a_tool_error() -> None:
    """Called outside guest mode, an asyncio tool fails with a ``ToolError``."""
    from netra_actors import ToolError

    async def job() -> int:
        return 1  # pragma: no cover

    tool = asyncio_tool(job)

    async def main() -> None:
        with pytest.raises(ToolError, match="AsyncioRuntime"):
            await tool.function()

    trio.run(main)


# -- docs/embedding.md ---------------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"


def doc_block(marker: str) -> str:
    """The python block of docs/embedding.md that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return next(b for b in blocks if marker in b)


def test_doc_plain_trio_example_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain-Trio example of docs/embedding.md runs (on a free port, in a fresh folder)."""
    monkeypatch.chdir(tmp_path)
    source = doc_block("serve, rt, config").replace('store="memory"', 'store="memory", port=0')
    namespace: dict[str, Any] = {}
    exec(source, namespace)

    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await namespace["main"]()

    trio.run(bounded)
    types = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert types[0] == "agent_started"
    assert types[-1] == "agent_completed"


def test_doc_asyncio_example_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The asyncio example of docs/embedding.md runs as written."""
    monkeypatch.chdir(tmp_path)
    exec(doc_block("asyncio.run(main())"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[1] == "agent_started"
    assert "agent_completed" in lines[-2]
    assert lines[-1] == "agent_cancelled"


def test_doc_asyncio_tool_example(make_config: MakeConfig) -> None:
    """The asyncio tool of docs/embedding.md registers, and runs on the asyncio loop."""
    namespace: dict[str, Any] = {}
    exec(doc_block("asyncio_tool(lookup_order)"), namespace)
    tool = namespace["tools"].get("lookup_order")
    assert tool.parameters["required"] == ["order_id"]

    async def main() -> list[Event]:
        async with AsyncioRuntime(
            make_config(),
            agents={"a": tool_calling_agent()},
            tools=namespace["tools"],
            llm=_tool_script("lookup_order", {"order_id": "A1"}),
        ) as rt:
            return await (await rt.start_run("kim", "where is A1?")).collect()

    events = run(main)
    completed = next(e for e in events if e.type == "tool_completed")
    assert completed.data["results"] == {"order_id": "A1", "status": "shipped"}


def test_the_bridge_benchmark_runs_and_checks_its_streams() -> None:
    """benchmarks/bench_asyncio_bridge.py at a tiny size: every way delivers every event
    (its own check_lifecycle and count assertions) and reports every figure."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_asyncio_bridge.py"
    spec = importlib.util.spec_from_file_location("bench_asyncio_bridge", path)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.measure(50, 1)
    assert set(results) == {"trio", "guest+trio", "guest+asyncio"}
    for figures in results.values():
        assert set(figures) == {"events_per_s", "cpu_us_per_event", "p50_ms", "p99_ms"}
        assert figures["events_per_s"] > 0


# --- agents written for asyncio ---------------------------------------------------------------


async def _asyncio_calculator_agent(bridge: AsyncioBridge) -> str:
    """An agent in asyncio: it thinks, runs the calculator, streams its answer."""
    assert isinstance(asyncio.current_task(), asyncio.Task)
    await bridge.thinking(f"working on {bridge.text!r}")
    result = await bridge.execute_tool("calculator", {"expression": "2+3*4"})
    await asyncio.sleep(0)  # an asyncio library call between steps
    await bridge.partial(f"= {result.results}")
    return f"2+3*4 = {result.results}"


def test_an_asyncio_agent_runs_on_the_asyncio_loop(make_config: MakeConfig) -> None:
    """``asyncio_agent``: its thinking, tool call and answer are the run's events, in order."""

    async def main() -> list[Event]:
        agents = {"aio": asyncio_agent(_asyncio_calculator_agent)}
        async with AsyncioRuntime(make_config(), agents=agents, tools=demo_tools()) as rt:
            return await (await rt.start_run("ann", "what is 2+3*4?")).collect()

    events = run(main)
    checked(events)
    assert [e.type for e in events] == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "agent_completed",
    ]
    assert events[3].data["results"] == 14
    assert events[-1].data["final_response"] == "2+3*4 = 14"


def test_an_asyncio_agent_streams_from_the_llm(make_config: MakeConfig) -> None:
    """``bridge.llm_stream`` hands the LLM turn's chunks to asyncio code."""

    async def agent(bridge: AsyncioBridge) -> str:
        request = ChatRequest((ChatMessage("user", bridge.text),))
        pieces = []
        async for chunk in bridge.llm_stream(request):
            if isinstance(chunk, TextDelta):
                pieces.append(chunk.text)
                await bridge.partial(chunk.text)
        return "".join(pieces)

    async def main() -> list[Event]:
        agents = {"aio": asyncio_agent(agent)}
        async with AsyncioRuntime(make_config(), agents=agents, tools=demo_tools()) as rt:
            return await (await rt.start_run("ann", "stream 5")).collect()

    events = run(main)
    checked(events)
    pieces = [e.data["text"] for e in events if e.type == "partial_result"]
    assert len(pieces) == 5
    assert events[-1].data["final_response"] == "".join(pieces)


@pytest.mark.parametrize("outcome", ["cancel", "crash"])
def test_an_asyncio_agent_is_cancelled_or_fails_like_any_agent(
    make_config: MakeConfig, outcome: str
) -> None:
    """Cancelling the run cancels the asyncio agent mid-tool (the tool reports
    ``cancelled``, the run ``agent_cancelled``); its exception is ``agent_error``."""
    cancelled: list[bool] = []

    async def agent(bridge: AsyncioBridge) -> str:
        if outcome == "crash":
            raise ValueError("the asyncio agent gave up")
        try:
            await bridge.execute_tool("sleep", {"seconds": 30})
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "never"

    async def main() -> list[Event]:
        agents = {"aio": asyncio_agent(agent)}
        async with AsyncioRuntime(make_config(), agents=agents, tools=demo_tools()) as rt:
            handle = await rt.start_run("ann", "go")
            events = []
            async for event in handle.events():
                events.append(event)
                if event.type == "tool_executing":
                    await handle.cancel()
            return events

    events = run(main)
    checked(events)
    if outcome == "cancel":
        assert cancelled == [True]
        assert events[-2].type == "tool_completed"
        assert events[-2].data["status"] == "cancelled"
        assert events[-1].type == "agent_cancelled"
    else:
        assert events[-1].type == "agent_error"
        assert "the asyncio agent gave up" in events[-1].data["error"]["message"]
