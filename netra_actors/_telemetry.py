"""Observability hooks: spans for runs, LLM calls and tool calls, and latency figures.

One ``Telemetry`` object per runtime. The runtime calls ``span`` around each
unit of work with that unit's ``UnifiedTraceContext``; the span ends exactly
when the ``with`` block ends, including on cancellation, so a cancelled or
abandoned run still closes its spans.

STUB: to be completed (OpenTelemetry export when the SDK is installed and
configured, structured logs, Prometheus latencies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from ._trace import UnifiedTraceContext

SpanKind = Literal["run", "llm", "tool"]


class Telemetry:
    """Receives the runtime's spans. The base class records nothing."""

    @contextlib.contextmanager
    def span(
        self,
        kind: SpanKind,
        name: str,
        trace: UnifiedTraceContext,
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Time the ``with`` block as one span of ``trace``; yields a dict for late attributes
        (e.g. ``status``) that the span records when it ends."""
        yield {}
