"""Tools: the registry agents offer to the model, and the engine that runs them.

``UnifiedToolExecutionEngine`` runs one tool call inside a session's
tool-executor actor and emits its two events: ``tool_executing`` before the
call and ``tool_completed`` after it, whatever happens (success, exception,
timeout, cancellation), so every ``tool_executing`` is matched by exactly one
``tool_completed`` with the same ``call_id``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, get_type_hints

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

ToolFunction = Callable[..., Awaitable[Any]]

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


def _schema_for(fn: ToolFunction) -> dict[str, Any]:
    """A JSON schema of ``fn``'s keyword parameters, from its signature and annotations."""
    hints = get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        json_type = _JSON_TYPES.get(hints.get(name))
        properties[name] = {"type": json_type} if json_type else {}
        if param.default is param.empty:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


@attrs.frozen
class Tool:
    """A named async function the model may call, with its parameter schema."""

    name: str
    description: str
    function: ToolFunction = attrs.field(eq=False)
    parameters: Mapping[str, Any] = attrs.field(factory=dict)
    timeout: float | None = None

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    def bind(self, arguments: Mapping[str, Any]) -> inspect.BoundArguments:
        """Check ``arguments`` against the signature. Raises ``ToolError`` (invalid_arguments)."""
        try:
            return inspect.signature(self.function).bind(**arguments)
        except TypeError as exc:
            raise ToolError(
                f"invalid arguments for {self.name!r}: {exc}", error_type="invalid_arguments"
            ) from None


class ToolRegistry:
    """The tools of a runtime, by name. Filled at start-up; read-only while runs execute."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

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
            self.add(
                Tool(
                    name=name or fn.__name__,
                    description=description or inspect.getdoc(fn) or "",
                    function=fn,
                    parameters=_schema_for(fn),
                    timeout=timeout,
                )
            )
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

    Stateless between calls (the registry is read-only), so one engine serves
    every session; each session's tool-executor actor drives it.
    """

    def __init__(self, registry: ToolRegistry, *, default_timeout: float | None = 60.0) -> None:
        self.registry = registry
        self.default_timeout = default_timeout

    async def execute(
        self,
        request: ExecuteTool,
        emit: trio.MemorySendChannel[EmitEvent],
        cancel_scope: trio.CancelScope,
    ) -> ToolResult:
        """Run one call under ``cancel_scope``; emit both events; return the outcome.

        Never raises for a tool's failure: exceptions become status ``error``,
        the timeout status ``timeout``, and a cancelled ``cancel_scope`` status
        ``cancelled``. ``tool_completed`` is emitted shielded, so it is sent even
        when the call is cancelled.
        """
        call = request.call
        trace = request.trace.child()
        await emit.send(
            EmitEvent(
                "tool_executing",
                request.run_id,
                request.thread_id,
                trace,
                {
                    "call_id": call.call_id,
                    "tool_name": call.name,
                    "parameters": dict(call.arguments),
                },
            )
        )
        started = time.perf_counter()
        status: ToolStatus = "ok"
        results: Any = None
        error: ErrorInfo | None = None
        tool = self.registry.get(call.name)
        timeout = (tool.timeout if tool else None) or self.default_timeout
        with cancel_scope:
            with trio.move_on_after(math.inf if timeout is None else timeout) as timer:
                try:
                    if tool is None:
                        raise ToolError(f"no tool named {call.name!r}", error_type="unknown_tool")
                    bound = tool.bind(call.arguments)
                    results = _check_json(await tool.function(*bound.args, **bound.kwargs))
                except ToolError as exc:
                    status, error = "error", ErrorInfo(exc.error_type, str(exc))
                except Exception as exc:
                    status, error = "error", ErrorInfo("tool_error", f"{type(exc).__name__}: {exc}")
            if timer.cancelled_caught:
                status = "timeout"
                error = ErrorInfo("timeout", f"{call.name!r} did not finish within {timeout} s")
        if cancel_scope.cancelled_caught:
            status, error = "cancelled", ErrorInfo("cancelled", "the run was cancelled")
        result = ToolResult(
            call_id=call.call_id,
            tool_name=call.name,
            status=status,
            results=results if status == "ok" else None,
            error=error,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
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
                EmitEvent("tool_completed", request.run_id, request.thread_id, trace, data)
            )
        return result


# Kept for code written against the backend this runtime replaces.
EnhancedToolExecutionEngine = UnifiedToolExecutionEngine


async def run_tool_executor(
    engine: UnifiedToolExecutionEngine,
    inbox: trio.MemoryReceiveChannel[ToolInbox],
    emit: trio.MemorySendChannel[EmitEvent],
) -> None:
    """The tool-executor actor of one session.

    Runs each ``ExecuteTool`` in its own task (so parallel calls run in
    parallel) and answers it with ``send_nowait`` on its reply channel, which
    never blocks: the run task waiting for the answer can never deadlock with
    the executor. ``CancelToolCall`` cancels that call's scope. Ends when its
    inbox closes and every call has finished; cancelling it cancels every call
    (each still emits ``tool_completed``).
    """
    scopes: dict[str, trio.CancelScope] = {}

    async def run_call(request: ExecuteTool, scope: trio.CancelScope) -> None:
        try:
            result = await engine.execute(request, emit, scope)
        finally:
            scopes.pop(request.call.call_id, None)
        # The run may have stopped waiting (torn down); its events were emitted anyway.
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock
        ):
            request.reply.send_nowait(result)

    async with emit, trio.open_nursery() as nursery:
        async for message in inbox:
            match message:
                case ExecuteTool():
                    scope = trio.CancelScope()
                    scopes[message.call.call_id] = scope
                    nursery.start_soon(run_call, message, scope)
                case CancelToolCall(call_id=call_id):
                    if (found := scopes.get(call_id)) is not None:
                        found.cancel()
