"""Tools: the registry agents offer to the model, and the engine that runs them.

``UnifiedToolExecutionEngine`` runs one tool call inside a session's
tool-executor actor and emits its two events: ``tool_executing`` before the
call and ``tool_completed`` after it, whatever happens (success, exception,
timeout, cancellation), so every ``tool_executing`` is matched by exactly one
``tool_completed`` with the same ``call_id``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

import attrs
import orjson
import trio

from ._exceptions import ToolError
from ._llm import ToolSpec
from ._messages import (
    CancelToolCall,
    EmitEvent,
    ErrorInfo,
    ExecuteTool,
    ToolInbox,
    ToolResult,
    ToolStatus,
)
from ._protocol import TOOL_ERROR_TYPES
from ._sequencer import Emitter
from ._telemetry import Telemetry
from ._tool_schema import ArgumentValidator, schema_for

ToolFunction = Callable[..., Any]


@attrs.frozen
class Tool:
    """A named function the model may call, with its parameter schema.

    ``function`` may be async (awaited in the session's tool executor) or
    plain (run in a worker thread, so it cannot block the event loop).
    """

    name: str
    description: str
    function: ToolFunction = attrs.field(eq=False)
    parameters: Mapping[str, Any] = attrs.field(factory=dict)
    timeout: float | None = None
    _validator: ArgumentValidator | None = attrs.field(default=None, eq=False, repr=False)
    #: The function's signature, read once (``inspect.signature`` costs ~0.3 ms a call).
    _signature: inspect.Signature = attrs.field(init=False, eq=False, repr=False)

    @_signature.default
    def _read_signature(self) -> inspect.Signature:
        return inspect.signature(self.function)

    @classmethod
    def from_function(
        cls,
        fn: ToolFunction,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Tool:
        """A tool whose schema is derived from ``fn``'s signature and docstring."""
        derived_description, derived = schema_for(fn)
        schema = dict(parameters) if parameters is not None else derived
        return cls(
            name=name or fn.__name__,
            description=description or derived_description,
            function=fn,
            parameters=schema,
            timeout=timeout,
            validator=ArgumentValidator(schema),
        )

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the underlying function directly (as if it were not decorated)."""
        return self.function(*args, **kwargs)

    def bind(self, arguments: Mapping[str, Any]) -> inspect.BoundArguments:
        """Check ``arguments`` against the schema and the signature.

        Raises:
            ToolError: ``invalid_arguments``, with every problem found.
        """
        if self._validator is not None:
            problems = self._validator.errors(arguments)
            if problems:
                raise ToolError(
                    f"invalid arguments for {self.name!r}: " + "; ".join(problems),
                    error_type="invalid_arguments",
                )
        try:
            return self._signature.bind(**arguments)
        except TypeError as exc:
            raise ToolError(
                f"invalid arguments for {self.name!r}: {exc}", error_type="invalid_arguments"
            ) from None


@overload
def tool(fn: ToolFunction, /) -> Tool: ...
@overload
def tool(
    *, name: str | None = None, description: str | None = None, timeout: float | None = None
) -> Callable[[ToolFunction], Tool]: ...
def tool(
    fn: ToolFunction | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Tool | Callable[[ToolFunction], Tool]:
    """Make a plain or async function a ``Tool`` (``@tool`` or ``@tool(timeout=5)``).

    The JSON schema comes from the signature and the docstring's ``Args:``
    section; the decorated name is the ``Tool`` (still callable as the function).
    Register it with ``ToolRegistry([...])`` or ``registry.add``.
    """

    def make(function: ToolFunction) -> Tool:
        return Tool.from_function(function, name=name, description=description, timeout=timeout)

    return make(fn) if fn is not None else make


class ToolRegistry:
    """The tools of a runtime, by name. Filled at start-up; read-only while runs execute."""

    def __init__(self, tools: Iterable[Tool | ToolFunction] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item if isinstance(item, Tool) else Tool.from_function(item))

    def add(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def tool(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        timeout: float | None = None,
    ) -> Callable[[ToolFunction], ToolFunction]:
        """Register an async function as a tool (decorator). Its docstring describes it."""

        def register(fn: ToolFunction) -> ToolFunction:
            self.add(Tool.from_function(fn, name=name, description=description, timeout=timeout))
            return fn

        return register

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(t.spec for t in self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)


def _check_json(value: Any) -> Any:
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise ToolError(
            f"result is not JSON-serialisable: {exc}", error_type="bad_result"
        ) from None
    return value


class UnifiedToolExecutionEngine:
    """Runs tool calls and emits ``tool_executing`` / ``tool_completed`` for each.

    Stateless between calls apart from its global concurrency limit (the
    registry is read-only), so one engine serves every session; each
    session's tool-executor actor drives it.

    Limits: at most ``max_concurrent`` tools run at once in the whole runtime
    (and at most the executor's own limit per session); a call waits for a
    slot after its ``tool_executing`` and before its timeout starts. Plain
    (sync) tools run in worker threads. A thread cannot be interrupted: when
    its call is cancelled or times out, the call is reported at once and the
    thread is abandoned (it runs to completion in the background, its result
    is dropped, and it keeps its thread until then).
    """

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        default_timeout: float | None = 60.0,
        max_concurrent: int = 64,
    ) -> None:
        self.registry = registry
        self.default_timeout = default_timeout
        self.limiter = trio.CapacityLimiter(max_concurrent)
        #: Receives a span per tool call (set by the runtime).
        self.telemetry = Telemetry()

    async def announce(self, state: ToolCallState, emit: Emitter) -> None:
        """Emit the call's ``tool_executing`` (with secret-looking parameters redacted)."""
        request = state.request
        await emit.send(
            EmitEvent(
                "tool_executing",
                request.run_id,
                request.thread_id,
                state.trace,
                {
                    "call_id": request.call.call_id,
                    "tool_name": request.call.name,
                    "parameters": redact(request.call.arguments),
                },
            )
        )

    async def execute(
        self,
        request: ExecuteTool,
        emit: Emitter,
        call: ToolCallState | None = None,
        *,
        session_limiter: trio.CapacityLimiter | None = None,
        announced: bool = False,
    ) -> ToolResult | None:
        """Run one call; emit ``tool_executing`` (unless ``announced``) and ``tool_completed``.

        Never raises for a tool's failure: exceptions become status ``error``,
        the timeout status ``timeout``, and a cancelled call (``call.scope``)
        status ``cancelled``. ``tool_completed`` is emitted shielded, so it is
        sent even when the call is cancelled. Returns ``None`` when the call was
        abandoned meanwhile (``ToolCallState.abandon``), whose ``tool_completed``
        has then already been emitted.
        """
        state = call or ToolCallState(request)
        if not announced:
            await self.announce(state, emit)
        attributes = {
            "run_id": request.run_id,
            "thread_id": request.thread_id,
            "call_id": request.call.call_id,
        }
        with self.telemetry.span("tool", request.call.name, state.trace, attributes) as span:
            status, results, error = await self._call(state, session_limiter)
            span["status"] = status
            if error is not None:
                span["error"] = f"{error.type}: {error.message}"
        return await state.settle(emit, status, results, error)

    async def _call(
        self, state: ToolCallState, session_limiter: trio.CapacityLimiter | None
    ) -> tuple[ToolStatus, Any, ErrorInfo | None]:
        """Run the call in ``state.scope``: ``(status, results, error)``; never raises for
        the tool's failure (see ``execute``)."""
        status: ToolStatus = "ok"
        results: Any = None
        error: ErrorInfo | None = None
        request = state.request
        tool = self.registry.get(request.call.name)
        timeout = (tool.timeout if tool else None) or self.default_timeout
        with state.scope:
            try:
                if request.call.invalid_arguments is not None:
                    raise ToolError(
                        f"invalid arguments for {request.call.name!r}: "
                        f"{request.call.invalid_arguments}",
                        error_type="invalid_arguments",
                    )
                if tool is None:
                    raise ToolError(
                        f"no tool named {request.call.name!r}", error_type="unknown_tool"
                    )
                bound = tool.bind(request.call.arguments)
                async with _Holding(session_limiter, self.limiter):
                    with trio.move_on_after(math.inf if timeout is None else timeout) as timer:
                        results = _check_json(await _invoke(tool, bound))
                if timer.cancelled_caught:
                    status = "timeout"
                    error = ErrorInfo("timeout", f"{tool.name!r} did not finish within {timeout} s")
            except ToolError as exc:
                # Only the frozen vocabulary goes on the wire; other types read as tool_error.
                kind = exc.error_type if exc.error_type in TOOL_ERROR_TYPES else "tool_error"
                status, error = "error", ErrorInfo(kind, str(exc))
            except Exception as exc:
                status, error = "error", ErrorInfo("tool_error", f"{type(exc).__name__}: {exc}")
        if state.scope.cancelled_caught:
            status, error = "cancelled", ErrorInfo("cancelled", "the run was cancelled")
        return status, results, error


class _Holding:
    """Holds a token of each limiter for the call, in order. A free token is taken
    without a scheduling point (the tool's own await follows at once); a call that
    must wait for one waits as ``CapacityLimiter.acquire`` does, and on cancel gives
    back what it took."""

    __slots__ = ("_held", "_limiters")

    def __init__(self, *limiters: trio.CapacityLimiter | None) -> None:
        self._limiters = [limiter for limiter in limiters if limiter is not None]
        self._held: list[trio.CapacityLimiter] = []

    async def __aenter__(self) -> None:
        try:
            for limiter in self._limiters:
                try:
                    limiter.acquire_nowait()
                except trio.WouldBlock:
                    await limiter.acquire()
                self._held.append(limiter)
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._held:
            self._held.pop().release()


async def _invoke(tool: Tool, bound: inspect.BoundArguments) -> Any:
    if tool.is_async:
        return await tool.function(*bound.args, **bound.kwargs)
    result = await trio.to_thread.run_sync(
        functools.partial(tool.function, *bound.args, **bound.kwargs), abandon_on_cancel=True
    )
    if inspect.isawaitable(result):
        # A plain function that returned an awaitable (e.g. a functools.partial of a coroutine).
        return await result
    return result


class ToolCallState:
    """One executing call, as the tool-executor actor tracks it.

    Exactly one ``tool_completed`` is emitted per call: by the call itself when
    it ends, or by ``abandon`` when a cancelled tool does not stop in time;
    whichever settles first wins, and the other emits nothing.
    """

    def __init__(self, request: ExecuteTool) -> None:
        self.request = request
        self.scope = trio.CancelScope()
        self.trace = request.trace.child()
        self.started = time.perf_counter()
        self.settled = False
        self.done = trio.Event()

    async def settle(
        self,
        emit: Emitter,
        status: ToolStatus,
        results: Any = None,
        error: ErrorInfo | None = None,
    ) -> ToolResult | None:
        """Emit ``tool_completed`` (shielded) unless already settled; the result, or ``None``."""
        if self.settled:
            return None
        self.settled = True
        self.done.set()
        call = self.request.call
        result = ToolResult(
            call_id=call.call_id,
            tool_name=call.name,
            status=status,
            results=results if status == "ok" else None,
            error=error,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
        )
        data: dict[str, Any] = {
            "call_id": call.call_id,
            "tool_name": call.name,
            "status": status,
            "duration_ms": result.duration_ms,
        }
        if status == "ok":
            data["results"] = results
        else:
            assert error is not None
            data["error"] = error.to_wire()
        with trio.CancelScope(shield=True):
            await emit.send(
                EmitEvent(
                    "tool_completed", self.request.run_id, self.request.thread_id, self.trace, data
                )
            )
        return result

    async def abandon(self, emit: Emitter) -> ToolResult | None:
        """Report a cancelled call that did not stop in time as ``cancelled``."""
        return await self.settle(
            emit,
            "cancelled",
            error=ErrorInfo("cancelled", "the run was cancelled; the tool did not stop in time"),
        )


#: Words that make a parameter name secret-looking, matched against the name's words
#: (``apiKey``, ``api-key`` and ``API_KEY`` all read as ``api`` + ``key``), so that
#: ``author`` or ``passenger`` are not redacted.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "secret",
        "token",
        "apikey",
        "credential",
        "credentials",
        "cookie",
        "authorization",
        "auth",
        "bearer",
        "jwt",
    }
)
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("private", "key"), ("session", "key"), ("access", "key")}
)
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def is_secret_key(key: str) -> bool:
    """Whether a parameter name looks like it holds a secret."""
    words = [w.lower() for w in _WORD.findall(key)]
    if _SECRET_WORDS.intersection(words):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


REDACTED = "[redacted]"


def redact(value: Any) -> Any:
    """A copy of tool parameters with the values of secret-looking keys replaced.

    Applies at any depth (objects inside lists and objects). Only what is
    *shown* in ``tool_executing`` is redacted; the tool gets the real values.
    """
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(key, str) and is_secret_key(key) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


# Kept for code written against the backend this runtime replaces.
EnhancedToolExecutionEngine = UnifiedToolExecutionEngine


async def run_tool_executor(
    engine: UnifiedToolExecutionEngine,
    inbox: trio.MemoryReceiveChannel[ToolInbox],
    emit: Emitter,
    *,
    cancel_grace: float = 5.0,
    max_concurrent: int = 16,
) -> None:
    """The tool-executor actor of one session.

    Runs each ``ExecuteTool`` in its own task (so parallel calls run in
    parallel) and answers it with ``send_nowait`` on its reply channel, which
    never blocks: the run task waiting for the answer can never deadlock with
    the executor. ``CancelToolCall`` cancels that call's scope; a tool that has
    not stopped ``cancel_grace`` seconds later is abandoned (reported
    ``cancelled`` at once; whatever it does later is dropped). Calls are keyed
    by ``(run_id, call_id)``. At most ``max_concurrent`` calls of the session
    run at once.

    Order: each call's ``tool_executing`` is emitted by this actor as its
    ``ExecuteTool`` arrives, so parallel calls are announced in the order the
    run submitted them (the order the model listed them); their
    ``tool_completed`` events follow in the order the calls finish.

    Ends when its inbox closes and every call has finished; cancelling it
    cancels every call (each still emits ``tool_completed``).
    """
    calls: dict[tuple[str, str], ToolCallState] = {}
    session_limiter = trio.CapacityLimiter(max_concurrent)

    def answer(state: ToolCallState, result: ToolResult | None) -> None:
        if result is None:
            return
        # The run may have stopped waiting (torn down); its events were emitted anyway.
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock
        ):
            state.request.reply.send_nowait(result)

    async def run_call(key: tuple[str, str], state: ToolCallState) -> None:
        try:
            result = await engine.execute(
                state.request, emit, state, session_limiter=session_limiter, announced=True
            )
            answer(state, result)
        finally:
            calls.pop(key, None)

    async def abandon_later(state: ToolCallState) -> None:
        with trio.move_on_after(cancel_grace):
            await state.done.wait()
            return
        answer(state, await state.abandon(emit))

    async with emit, trio.open_nursery() as nursery:
        async for message in inbox:
            match message:
                case ExecuteTool():
                    key = (message.run_id, message.call.call_id)
                    state = ToolCallState(message)
                    calls[key] = state
                    await engine.announce(state, emit)
                    nursery.start_soon(run_call, key, state)
                case CancelToolCall(run_id=run_id, call_id=call_id):
                    if (found := calls.get((run_id, call_id))) is not None:
                        found.scope.cancel()
                        nursery.start_soon(abandon_later, found)
