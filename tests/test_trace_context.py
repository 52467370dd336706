"""Trace context (netra_actors._trace): W3C-compatible ids, child spans, ``traceparent`` headers."""

from __future__ import annotations

import re

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from netra_actors._trace import UnifiedTraceContext

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$")

HEADER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
HEADER_SPAN = "00f067aa0ba902b7"
HEADER = f"00-{HEADER_TRACE}-{HEADER_SPAN}-01"

hex_digits = "0123456789abcdef"


def _assert_well_formed(ctx: UnifiedTraceContext) -> None:
    assert TRACE_ID.match(ctx.trace_id), ctx.trace_id
    assert SPAN_ID.match(ctx.span_id), ctx.span_id
    assert ctx.parent_span_id is None or SPAN_ID.match(ctx.parent_span_id)


def _assert_fresh_root(ctx: UnifiedTraceContext) -> None:
    _assert_well_formed(ctx)
    assert ctx.parent_span_id is None
    assert ctx.sampled is True
    assert ctx.trace_id not in {HEADER_TRACE, "0" * 32}


# --- roots and children --------------------------------------------------------------------------


def test_new_root_ids_are_lowercase_hex() -> None:
    """A root has a 32-hex-digit trace id, a 16-hex-digit span id, no parent, and is sampled."""
    ctx = UnifiedTraceContext.new_root()
    _assert_well_formed(ctx)
    assert ctx.parent_span_id is None
    assert ctx.sampled is True


def test_new_roots_differ() -> None:
    """Every root gets its own trace id and span id."""
    roots = [UnifiedTraceContext.new_root() for _ in range(50)]
    assert len({r.trace_id for r in roots}) == 50
    assert len({r.span_id for r in roots}) == 50


def test_child_continues_the_trace() -> None:
    """A child keeps the trace id, gets a new span id, and names its parent's span."""
    root = UnifiedTraceContext.new_root()
    child = root.child()
    _assert_well_formed(child)
    assert child.trace_id == root.trace_id
    assert child.span_id != root.span_id
    assert child.parent_span_id == root.span_id
    assert child.sampled == root.sampled


def test_grandchildren_chain_parents() -> None:
    """Each generation's parent is the previous generation's span; siblings differ."""
    root = UnifiedTraceContext.new_root()
    child = root.child()
    grandchild = child.child()
    sibling = root.child()
    assert grandchild.parent_span_id == child.span_id
    assert grandchild.trace_id == root.trace_id
    assert sibling.span_id != child.span_id
    assert sibling.parent_span_id == root.span_id


def test_child_keeps_the_sampled_flag() -> None:
    """A child of an unsampled context is unsampled too."""
    ctx = UnifiedTraceContext(trace_id=HEADER_TRACE, span_id=HEADER_SPAN, sampled=False)
    assert ctx.child().sampled is False


def test_context_is_immutable() -> None:
    """A trace context cannot be changed in place."""
    ctx = UnifiedTraceContext.new_root()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.span_id = "0" * 16  # type: ignore[misc]


# --- traceparent ----------------------------------------------------------------------------------


def test_valid_traceparent_is_continued() -> None:
    """A valid header's trace continues: same trace id, the header's span as parent, a new span."""
    ctx = UnifiedTraceContext.from_traceparent(HEADER)
    _assert_well_formed(ctx)
    assert ctx.trace_id == HEADER_TRACE
    assert ctx.parent_span_id == HEADER_SPAN
    assert ctx.span_id != HEADER_SPAN
    assert ctx.sampled is True


@pytest.mark.parametrize(
    ("flags", "sampled"),
    [("01", True), ("00", False), ("03", True), ("02", False), ("ff", True), ("fe", False)],
)
def test_sampled_flag_is_bit_zero(flags: str, sampled: bool) -> None:
    """``sampled`` is the lowest bit of the header's trace flags."""
    ctx = UnifiedTraceContext.from_traceparent(f"00-{HEADER_TRACE}-{HEADER_SPAN}-{flags}")
    assert ctx.trace_id == HEADER_TRACE
    assert ctx.sampled is sampled


def test_future_version_with_the_same_shape_is_continued() -> None:
    """A version other than ``00`` and ``ff`` is accepted when the header has the version-00 shape."""
    ctx = UnifiedTraceContext.from_traceparent(f"01-{HEADER_TRACE}-{HEADER_SPAN}-01")
    assert ctx.trace_id == HEADER_TRACE
    assert ctx.parent_span_id == HEADER_SPAN


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "00",
        f"00-{HEADER_TRACE}-{HEADER_SPAN}",
        f"00-{HEADER_TRACE}-{HEADER_SPAN}-01-extra",
        f"00-{HEADER_TRACE[:-1]}-{HEADER_SPAN}-01",
        f"00-{HEADER_TRACE}0-{HEADER_SPAN}-01",
        f"00-{HEADER_TRACE}-{HEADER_SPAN[:-1]}-01",
        f"00-{HEADER_TRACE}-{HEADER_SPAN}0-01",
        f"00-{HEADER_TRACE}-{HEADER_SPAN}-1",
        f"0-{HEADER_TRACE}-{HEADER_SPAN}-01",
        f"00-{HEADER_TRACE[:-1]}g-{HEADER_SPAN}-01",
        f"00-{HEADER_TRACE}-{HEADER_SPAN[:-1]}z-01",
        f"00_{HEADER_TRACE}_{HEADER_SPAN}_01",
        f"00-{'0' * 32}-{HEADER_SPAN}-01",
        f"00-{HEADER_TRACE}-{'0' * 16}-01",
        f"ff-{HEADER_TRACE}-{HEADER_SPAN}-01",
        f"00-{HEADER_TRACE}-{HEADER_SPAN}-01\x00",
    ],
)
def test_invalid_traceparent_starts_a_new_trace(header: str | None) -> None:
    """An absent or invalid header (shape, all-zero ids, version ff) gives a fresh root, never an error."""
    _assert_fresh_root(UnifiedTraceContext.from_traceparent(header))


def test_to_traceparent_format() -> None:
    """``to_traceparent`` writes version 00, the ids, and flags 01 or 00."""
    ctx = UnifiedTraceContext(trace_id=HEADER_TRACE, span_id=HEADER_SPAN)
    assert ctx.to_traceparent() == HEADER
    unsampled = UnifiedTraceContext(trace_id=HEADER_TRACE, span_id=HEADER_SPAN, sampled=False)
    assert unsampled.to_traceparent() == f"00-{HEADER_TRACE}-{HEADER_SPAN}-00"


@pytest.mark.parametrize("sampled", [True, False])
def test_to_traceparent_round_trips(sampled: bool) -> None:
    """Continuing a context's own header keeps its trace and sampling, with its span as parent."""
    ctx = UnifiedTraceContext.new_root().child()
    ctx = attrs.evolve(ctx, sampled=sampled)
    header = ctx.to_traceparent()
    assert TRACEPARENT.match(header)
    continued = UnifiedTraceContext.from_traceparent(header)
    assert continued.trace_id == ctx.trace_id
    assert continued.parent_span_id == ctx.span_id
    assert continued.sampled is sampled


@given(
    st.text(hex_digits, min_size=32, max_size=32),
    st.text(hex_digits, min_size=16, max_size=16),
    st.integers(min_value=0, max_value=255),
)
def test_any_valid_header_is_continued(trace_id: str, span_id: str, flags: int) -> None:
    """Every well-formed version-00 header with non-zero ids is continued exactly."""
    assume(trace_id != "0" * 32 and span_id != "0" * 16)
    ctx = UnifiedTraceContext.from_traceparent(f"00-{trace_id}-{span_id}-{flags:02x}")
    assert ctx.trace_id == trace_id
    assert ctx.parent_span_id == span_id
    assert ctx.sampled is bool(flags & 1)
    assert TRACEPARENT.match(ctx.to_traceparent())


@given(st.none() | st.text())
def test_any_header_gives_a_well_formed_context(header: str | None) -> None:
    """Whatever the header, ``from_traceparent`` returns a well-formed context and never raises."""
    ctx = UnifiedTraceContext.from_traceparent(header)
    _assert_well_formed(ctx)
    assert TRACEPARENT.match(ctx.to_traceparent())
