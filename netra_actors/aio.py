"""Run the Trio runtime inside an asyncio program (FastAPI, Starlette...), in one thread.

``AsyncioRuntime`` starts a ``Runtime`` as a Trio *guest run* on the running
asyncio loop (``trio.lowlevel.start_guest_run``): Trio's task steps run as
callbacks of the asyncio loop, on its thread; only Trio's I/O wait happens
in a helper thread, invisibly. So both loops share one thread and one can
call the other's *synchronous* APIs directly (``rt.statistics()``, setting a
``trio.Event`` from asyncio, resolving an ``asyncio.Future`` from Trio). Async
code crosses through explicit bridges:

- asyncio -> Trio: ``await rt.call(trio_async_fn, *args)`` runs the function
  as a Trio task of the runtime and returns (or raises) its outcome to the
  asyncio caller; ``start_run``, ``cancel_run`` and run handles are built on it.
- Trio -> asyncio: ``await run_asyncio(asyncio_async_fn, *args)`` from Trio
  code runs the coroutine as an asyncio task; ``asyncio_tool`` makes a tool of
  an asyncio coroutine function with it.

Cancellation crosses both ways: cancelling the asyncio side of a ``call``
cancels its Trio task (and waits for it to end); cancelling the Trio side of
``run_asyncio`` cancels its asyncio task. One guest run per thread (and so per
asyncio loop): use one ``AsyncioRuntime`` per process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any, TypeVar, cast

import outcome
import trio

from ._agents import Agent
from ._bridge import AgentWebSocketBridge
from ._config import Config
from ._connection import Connection
from ._exceptions import AgentError, RuntimeClosed, ToolError
from ._llm import ChatMessage, ChatRequest, LLMChunk, ToolSpec
from ._messages import CancelOutcome, Event, ThreadPolicy, ToolCall, ToolResult
from ._runtime import RunHandle, Runtime, RuntimeStatistics
from ._tools import Tool
from ._transport import Transport

T = TypeVar("T")

#: Events a run handle buffers on the asyncio side before its Trio reader waits
#: for the consumer (the session is paced by that reader, as by a connection).
EVENT_BUFFER = 64


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class AsyncioRuntime:
    """A ``Runtime`` run as a Trio guest on the running asyncio loop.

    Use as ``async with AsyncioRuntime(config, agents=..., tools=...) as rt:``
    from asyncio code; the keyword arguments are those of ``Runtime``. Leaving
    the block normally shuts the runtime down gracefully (``Runtime.aclose``:
    runs are cancelled with reason ``shutdown`` and emit their terminal events)
    and waits for the guest run to finish. Leaving it with an exception
    (including the owning task's cancellation) cancels the Trio side at once,
    as leaving ``Runtime``'s own block with an exception does, and still waits
    for the guest run to finish before propagating.

    Raises (from ``__aenter__``): whatever starting the ``Runtime`` raised.
    """

    def __init__(self, config: Config | None = None, **runtime_kwargs: Any) -> None:
        self._config = config
        self._runtime_kwargs = runtime_kwargs
        self._runtime: Runtime | None = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._stop: trio.Event | None = None
        self._ready: asyncio.Future[None] | None = None
        self._done: asyncio.Future[outcome.Outcome[None]] | None = None
        self._cancel_requested = False
        self._reported = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncioRuntime:
        if self._done is not None:
            raise RuntimeError("an AsyncioRuntime can be entered only once")
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._done = done = loop.create_future()
        try:
            trio.lowlevel.start_guest_run(
                self._main,
                run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                run_sync_soon_not_threadsafe=loop.call_soon,
                done_callback=functools.partial(_resolve, done),
                # asyncio may use signal.set_wakeup_fd (add_signal_handler); let it own it.
                host_uses_signal_set_wakeup_fd=True,
            )
        except BaseException:
            # E.g. a Trio run is already going on in this thread: nothing started.
            self._done = None
            raise
        try:
            await asyncio.wait((self._ready, done), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._cancel()
            await self._wait_done()
            raise
        if not self._ready.done():
            self._reported = True
            done.result().unwrap()
            raise RuntimeClosed("the runtime stopped while starting")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()
        else:
            self._cancel()
            await self._wait_done()

    async def aclose(self) -> None:
        """Shut down gracefully and wait for the guest run to finish; idempotent.

        If the calling task is cancelled meanwhile, the Trio side is cancelled
        at once, the guest run is still waited for, then ``CancelledError`` is
        raised.
        """
        if self._done is None:
            return
        if self._stop is not None:
            self._stop.set()
        result = await self._wait_done()
        if not self._reported:
            # The guest run's own failure, reported once (an Outcome unwraps once).
            self._reported = True
            result.unwrap()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """``async with self`` as an ASGI lifespan: ``Starlette(..., lifespan=rt.lifespan)``.

        Yields nothing (no lifespan state), so the runtime lives exactly as long
        as the application.
        """
        async with self:
            yield

    def _cancel(self) -> None:
        self._cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()

    async def _wait_done(self) -> outcome.Outcome[None]:
        """The guest run's outcome, once it finished; cancellation only escalates it."""
        assert self._done is not None
        cancelled = False
        while not self._done.done():
            try:
                await asyncio.shield(self._done)
            except asyncio.CancelledError:
                if self._done.done():
                    break
                # The guest run must run to completion (Trio's rule), so cancel it
                # and keep waiting; the cancellation is raised once it finished.
                cancelled = True
                self._cancel()
        if cancelled:
            raise asyncio.CancelledError
        return self._done.result()

    async def _main(self) -> None:
        """The guest run: the runtime and a nursery for ``call``s, until asked to stop."""
        self._scope = trio.CancelScope()
        self._stop = trio.Event()
        if self._cancel_requested:
            self._scope.cancel()
        try:
            with self._scope:
                async with (
                    Runtime(self._config, **self._runtime_kwargs) as runtime,
                    trio.open_nursery() as nursery,
                ):
                    self._runtime, self._nursery = runtime, nursery
                    assert self._ready is not None
                    _resolve(self._ready, None)
                    await self._stop.wait()
                    # Calls go on while the runs end (a reader of a run's events
                    # receives its agent_cancelled), then those left are cancelled.
                    await runtime.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None

    # -- the bridge ---------------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        """The Trio ``Runtime``. Its synchronous methods may be called from asyncio
        directly (same thread); await its async methods through ``call``.

        Raises:
            RuntimeClosed: the runtime is not running.
        """
        if self._runtime is None or self._done is None or self._done.done():
            raise RuntimeClosed("the runtime is not running")
        return self._runtime

    @property
    def closing(self) -> bool:
        """Whether shutdown has begun (or the runtime is not running)."""
        return self._runtime is None or self._nursery is None or self._runtime.closing

    async def call(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run the Trio async function ``async_fn(*args)`` in the runtime; its result.

        An exception it raises is raised here. Cancelling the caller cancels the
        Trio task and waits for it to end before ``CancelledError`` propagates.

        Raises:
            RuntimeClosed: the runtime is not running, or stopped before the call
                finished.
        """
        return await self._call(async_fn, args)

    async def _call(
        self,
        async_fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        discard: Callable[[T], object] | None = None,
    ) -> T:
        """``call``; ``discard`` receives a result that came too late for a cancelled caller."""
        if self._nursery is None or self._done is None or self._done.done():
            raise RuntimeClosed("the runtime is not running")
        return await _call_in(self._nursery, async_fn, args, discard)

    # -- runs ---------------------------------------------------------------------------------

    async def start_run(
        self,
        user_id: str,
        text: str,
        *,
        thread_id: str = "main",
        agent: str | None = None,
        client_msg_id: str | None = None,
        traceparent: str | None = None,
        policy: ThreadPolicy | None = None,
    ) -> AsyncioRunHandle:
        """Start (or queue) a run; iterate the handle's ``events()`` (see ``Runtime.start_run``).

        Raises:
            RuntimeClosed: the runtime or the session is shutting down.
            RunRefused: the thread policy or a limit refused the run.
        """
        runtime = self.runtime

        async def start() -> RunHandle:
            return await runtime.start_run(
                user_id,
                text,
                thread_id=thread_id,
                agent=agent,
                client_msg_id=client_msg_id,
                traceparent=traceparent,
                policy=policy,
            )

        handle = await self._call(start, (), discard=RunHandle.close)
        return AsyncioRunHandle(self, handle)

    async def cancel_run(self, user_id: str, run_id: str, reason: str = "client") -> CancelOutcome:
        """Cancel a run of ``user_id`` (see ``Runtime.cancel_run``)."""
        return await self.call(self.runtime.cancel_run, user_id, run_id, reason)

    async def serve_connection(
        self, user_id: str, transport: Transport, **options: Any
    ) -> Connection:
        """``Runtime.serve_connection`` for a transport whose methods run in Trio
        (``netra_actors.asgi.AsgiTransport``); returns when the connection ended."""
        runtime = self.runtime

        async def serve() -> Connection:
            return await runtime.serve_connection(user_id, transport, **options)

        return await self.call(serve)

    def statistics(self) -> RuntimeStatistics:
        """The runtime's ``statistics()`` (a synchronous call; same thread)."""
        return self.runtime.statistics()


async def _run_call(
    future: asyncio.Future[T],
    scope: trio.CancelScope,
    async_fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
) -> None:
    """The Trio side of ``AsyncioRuntime.call``: settles ``future`` whatever happens."""
    try:
        with scope:
            try:
                value = await async_fn(*args)
            except Exception as exc:
                _fail(future, exc)
            else:
                _resolve(future, value)
    finally:
        if not future.done():
            if scope.cancel_called:
                future.cancel()  # the asyncio caller asked for it
            else:
                _fail(future, RuntimeClosed("the runtime stopped before the call finished"))


class AsyncioRunHandle:
    """A run started through ``AsyncioRuntime.start_run`` (asyncio side of a ``RunHandle``).

    ``events()`` yields the run's ``Event`` objects from ``agent_started`` to
    the terminal event, then stops; it can be iterated once. A Trio task reads
    the run's events into a small buffer ahead of the consumer (``EVENT_BUFFER``
    events), then waits for it, so a slow consumer paces the session as a slow
    connection does.
    """

    def __init__(self, runtime: AsyncioRuntime, handle: RunHandle) -> None:
        self._runtime = runtime
        self.handle = handle
        self.run_id = handle.run_id
        self.thread_id = handle.thread_id
        self._reader: _EventReader | None = None

    async def events(self) -> AsyncGenerator[Event, None]:
        """Yield this run's events; returns after the terminal event.

        Cancelling the consuming task (or closing the iterator, or ``close()``)
        stops reading the run's events; the run goes on.

        Raises:
            RuntimeClosed: the session or the runtime ended before the run's
                terminal event.
        """
        if self._reader is not None:
            raise RuntimeError("events() can be iterated only once")
        reader = self._reader = _EventReader(self.handle)
        nursery = self._runtime._nursery
        try:
            if nursery is None:
                raise RuntimeError("no nursery")
            nursery.start_soon(reader.run)
        except RuntimeError:  # the nursery closed: the runtime is stopping
            self.handle.close()
            raise RuntimeClosed("the runtime is not running") from None
        try:
            while True:
                if reader.buffer:
                    event = reader.buffer.popleft()
                    reader.space.set()
                    yield event
                    continue
                if reader.finished:
                    if reader.error is not None:
                        raise reader.error
                    return
                reader.waiter = asyncio.get_running_loop().create_future()
                await reader.waiter
        finally:
            reader.stop()

    async def collect(self) -> list[Event]:
        """All of the run's events, once it has ended."""
        async with aclosing(self.events()) as events:
            return [event async for event in events]

    async def cancel(self, reason: str = "client") -> CancelOutcome:
        """Cancel the run (queued or active)."""
        return await self._runtime.call(self.handle.cancel, reason)

    def close(self) -> None:
        """Stop reading the run's events (the run goes on); idempotent."""
        if self._reader is not None:
            self._reader.stop()
        else:
            self.handle.close()


class _EventReader:
    """The Trio task that moves one run's events to the asyncio consumer."""

    def __init__(self, handle: RunHandle) -> None:
        self.handle = handle
        self.buffer: collections.deque[Event] = collections.deque()
        self.space = trio.Event()
        self.scope = trio.CancelScope()
        self.waiter: asyncio.Future[None] | None = None
        self.finished = False
        self.error: BaseException | None = None

    def _wake(self) -> None:
        if self.waiter is not None:
            _resolve(self.waiter, None)

    def stop(self) -> None:
        """Stop reading (the consumer left); the run's subscription is closed."""
        self.scope.cancel()
        self.handle.close()

    async def run(self) -> None:
        complete = False
        try:
            with self.scope:
                async with aclosing(
                    cast(AsyncGenerator[Event, None], self.handle.events())
                ) as events:
                    async for event in events:
                        self.buffer.append(event)
                        self._wake()
                        while len(self.buffer) >= EVENT_BUFFER:
                            self.space = trio.Event()
                            await self.space.wait()
                complete = True
        except Exception as exc:
            self.error = exc
        finally:
            self.handle.close()
            if not complete and self.error is None and not self.scope.cancel_called:
                self.error = RuntimeClosed(
                    f"the runtime stopped before run {self.handle.run_id} ended"
                )
            self.finished = True
            self._wake()


# -- Trio -> asyncio ---------------------------------------------------------------------------

#: How long a cancelled ``run_asyncio`` waits for its asyncio task to finish.
CANCEL_WAIT = 5.0


async def run_asyncio(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    cancel_wait: float = CANCEL_WAIT,
) -> T:
    """From Trio code in guest mode: run ``async_fn(*args)`` as an asyncio task; its result.

    Its exception is raised here. Cancelling the Trio caller cancels the asyncio
    task and waits up to ``cancel_wait`` seconds for it to end (shielded), then
    re-raises the cancellation. An asyncio task cancelled from elsewhere is
    reported as ``RuntimeClosed``.

    Raises:
        RuntimeError: there is no running asyncio loop (Trio is not a guest of asyncio).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(async_fn(*args), loop=loop)
    done = trio.Event()
    # asyncio calls this on the shared thread; setting a trio.Event there is allowed.
    task.add_done_callback(lambda _: done.set())
    try:
        await done.wait()
    except BaseException:
        task.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(cancel_wait):
            await done.wait()
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the caller was cancelled, not the task's error
        raise
    if task.cancelled():
        raise RuntimeClosed(f"the asyncio task running {_name(async_fn)} was cancelled")
    return task.result()


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def asyncio_tool(
    fn: Callable[..., Awaitable[Any]],
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    cancel_wait: float = CANCEL_WAIT,
) -> Tool:
    """A ``Tool`` that runs the asyncio coroutine function ``fn`` on the host asyncio loop.

    For runtimes run by ``AsyncioRuntime``: the tool's call runs ``fn`` as an
    asyncio task (so it can use asyncio libraries: database drivers, the
    application's own clients), and its result or exception becomes the call's
    ``tool_completed``. Cancelling the call (the run cancelled, the tool's
    timeout) cancels the asyncio task. The schema is derived from ``fn`` as
    ``@tool`` does. Under plain ``trio.run`` (no asyncio loop) the call fails
    with a ``tool_error``.
    """

    @functools.wraps(fn)
    async def on_asyncio(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ToolError(
                f"{fn.__name__!r} is an asyncio tool: run the runtime with AsyncioRuntime"
            ) from None
        return await run_asyncio(functools.partial(fn, *args, **kwargs), cancel_wait=cancel_wait)

    return Tool.from_function(
        on_asyncio,
        name=name or fn.__name__,
        description=description,
        timeout=timeout,
    )


# -- agents written for asyncio ----------------------------------------------------------------


async def _call_in(
    nursery: trio.Nursery,
    async_fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    discard: Callable[[T], object] | None = None,
) -> T:
    """From asyncio code (the host thread): run the Trio ``async_fn(*args)`` in ``nursery``.

    Cancelling the asyncio caller cancels the Trio task and waits for it to end;
    ``discard`` receives a result that came too late for the cancelled caller.

    Raises:
        RuntimeClosed: the nursery is closed (the runtime or the run is over), or it
            stopped before the call finished.
    """
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    scope = trio.CancelScope()
    try:
        # A synchronous Trio call from the host thread: allowed in guest mode.
        nursery.start_soon(_run_call, future, scope, async_fn, args)
    except RuntimeError:  # the nursery closed
        raise RuntimeClosed("the runtime is not running") from None
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if not future.done():
            scope.cancel()
            await asyncio.wait((future,))
        if discard is not None and not future.cancelled() and future.exception() is None:
            discard(future.result())
        raise


class AsyncioBridge:
    """What an asyncio agent (``asyncio_agent``) sees of its run: the methods of
    ``AgentWebSocketBridge``, awaited from asyncio. Each call runs on the Trio side, in
    the run (its events, its tool calls, its cancellation); cancelling the asyncio agent
    cancels the call in flight."""

    def __init__(self, bridge: AgentWebSocketBridge, nursery: trio.Nursery) -> None:
        self._bridge = bridge
        self._nursery = nursery

    @property
    def run_id(self) -> str:
        return self._bridge.run_id

    @property
    def user_id(self) -> str:
        return self._bridge.user_id

    @property
    def thread_id(self) -> str:
        return self._bridge.thread_id

    @property
    def text(self) -> str:
        """The user's message that started the run."""
        return self._bridge.text

    @property
    def tool_specs(self) -> tuple[ToolSpec, ...]:
        return self._bridge.tool_specs

    def next_step(self) -> int:
        return self._bridge.next_step()

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._bridge.record_usage(prompt_tokens, completion_tokens)

    async def thinking(self, reasoning: str, step: int | None = None) -> None:
        await _call_in(self._nursery, self._bridge.thinking, (reasoning, step))

    async def partial(self, text: str) -> None:
        await _call_in(self._nursery, self._bridge.partial, (text,))

    async def execute_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, call_id: str | None = None
    ) -> ToolResult:
        run = functools.partial(self._bridge.execute_tool, call_id=call_id)
        return await _call_in(self._nursery, run, (name, arguments))

    async def execute_tools(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        return await _call_in(self._nursery, self._bridge.execute_tools, (calls,))

    async def history(self) -> list[ChatMessage]:
        return await _call_in(self._nursery, self._bridge.history, ())

    async def remember(self, messages: Sequence[ChatMessage]) -> None:
        await _call_in(self._nursery, self._bridge.remember, (messages,))

    async def llm_stream(
        self, request: ChatRequest, *, provider: str | None = None
    ) -> AsyncGenerator[LLMChunk, None]:
        """The chunks of one LLM turn (``LLMManager.stream`` on the Trio side)."""
        queue: asyncio.Queue[LLMChunk | BaseException | None] = asyncio.Queue()
        scope = trio.CancelScope()

        async def pump() -> None:
            with scope:
                try:
                    async with aclosing(self._bridge.llm.stream(request, provider=provider)) as it:
                        async for chunk in it:
                            queue.put_nowait(chunk)
                except Exception as exc:
                    queue.put_nowait(exc)
                    return
            queue.put_nowait(None)

        self._nursery.start_soon(pump)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            scope.cancel()


def asyncio_agent(fn: Callable[[AsyncioBridge], Awaitable[str | None]]) -> Agent:
    """An agent written as an asyncio coroutine function, for runtimes run by
    ``AsyncioRuntime``: ``fn(bridge)`` runs as an asyncio task and talks to its run
    through an ``AsyncioBridge``. Its return value is the final answer, its exception
    the run's ``agent_error``; cancelling the run cancels the asyncio task (waiting up
    to ``CANCEL_WAIT`` seconds for it). Under plain ``trio.run`` the run fails with
    ``agent_error``: there is no asyncio loop to run it on.
    """

    @functools.wraps(fn)
    async def agent(bridge: AgentWebSocketBridge) -> str:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise AgentError(
                f"{_name(fn)} is an asyncio agent: run the runtime with AsyncioRuntime"
            ) from None
        async with trio.open_nursery() as nursery:
            result = await run_asyncio(fn, AsyncioBridge(bridge, nursery))
            nursery.cancel_scope.cancel()
        return "" if result is None else str(result)

    return agent
