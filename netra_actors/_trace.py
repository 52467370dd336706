"""Trace context: W3C-compatible trace and span ids carried on every message and event."""

from __future__ import annotations

import re
import secrets

import attrs

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def _new_trace_id() -> str:
    return secrets.token_hex(16)


def _new_span_id() -> str:
    return secrets.token_hex(8)


@attrs.frozen
class UnifiedTraceContext:
    """Trace id, span id and parent span id of one unit of work (a run, an LLM call, a tool call).

    Immutable: ``child()`` makes the context of a nested unit. ``trace_id`` is 32
    lowercase hex digits and ``span_id`` 16, as in W3C Trace Context, so a
    ``traceparent`` header can be accepted and emitted unchanged.
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    sampled: bool = True

    @classmethod
    def new_root(cls) -> UnifiedTraceContext:
        """A fresh trace with a root span."""
        return cls(trace_id=_new_trace_id(), span_id=_new_span_id())

    @classmethod
    def from_traceparent(cls, header: str | None) -> UnifiedTraceContext:
        """Continue the trace of a W3C ``traceparent`` value, or start a new one.

        An absent or invalid header (wrong shape, all-zero ids, version ``ff``)
        starts a new trace instead of failing: tracing must never refuse work.
        """
        if header:
            m = _TRACEPARENT.match(header.strip().lower())
            if m is not None:
                version, trace_id, parent, flags = m.groups()
                if version != "ff" and trace_id != _ZERO_TRACE and parent != _ZERO_SPAN:
                    return cls(
                        trace_id=trace_id,
                        span_id=_new_span_id(),
                        parent_span_id=parent,
                        sampled=bool(int(flags, 16) & 1),
                    )
        return cls.new_root()

    def child(self) -> UnifiedTraceContext:
        """The context of a unit of work nested in this one (same trace, new span)."""
        return UnifiedTraceContext(
            trace_id=self.trace_id,
            span_id=_new_span_id(),
            parent_span_id=self.span_id,
            sampled=self.sampled,
        )

    def to_traceparent(self) -> str:
        """This context as a W3C ``traceparent`` value."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"
