"""Prometheus metrics of a runtime, served by the gateway at ``GET /metrics``.

Each ``RuntimeMetrics`` owns its own ``CollectorRegistry`` (never the process-wide
default one: several runtimes may live in one process, as in the tests). Two
kinds of figures live in it:

- instruments updated as things happen: latency histograms fed by the spans of
  ``Telemetry`` (tool calls, LLM calls, runs), LLM tokens, events delivered to
  connections, and refused requests;
- figures read from the runtime only when scraped (``watch``): sessions,
  connections, active and queued runs, the sequencers' backlog, and the
  cumulative totals of the runtime's execution tracker. Nothing on the event
  path pays for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["CONTENT_TYPE_LATEST", "RuntimeMetrics", "metrics_for"]

#: Outcomes of ``netra_runs_finished_total``, always exposed (zero until one happens).
RUN_OUTCOMES = ("completed", "failed", "cancelled", "timed_out")

_TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
_RUN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class RuntimeMetrics:
    """The Prometheus instruments of one runtime, in a registry of their own.

    ``Telemetry(metrics=...)`` feeds the histograms from its spans; ``watch``
    adds the figures read from a runtime at scrape time; ``render`` produces
    the text exposition format.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tool_seconds = Histogram(
            "netra_tool_duration_seconds",
            "Duration of tool calls, by tool and status (ok, error, timeout, cancelled).",
            ["tool", "status"],
            buckets=_TOOL_BUCKETS,
            registry=self.registry,
        )
        self.llm_seconds = Histogram(
            "netra_llm_duration_seconds",
            "Duration of LLM calls (one streamed turn), by provider, model and status.",
            ["provider", "model", "status"],
            buckets=_LLM_BUCKETS,
            registry=self.registry,
        )
        self.llm_tokens = Counter(
            "netra_llm_tokens",
            "Tokens reported by LLM providers, by provider, model and kind (prompt, completion).",
            ["provider", "model", "kind"],
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "netra_run_duration_seconds",
            "Duration of runs (start to terminal event), by status.",
            ["status"],
            buckets=_RUN_BUCKETS,
            registry=self.registry,
        )
        self.events_delivered = Counter(
            "netra_events_delivered",
            "Events sent to client connections (one per connection that received it).",
            registry=self.registry,
        )
        self.refusals = Counter(
            "netra_http_refusals",
            "Requests and WebSocket handshakes refused by the gateway, by HTTP status and error.",
            ["status", "error"],
            registry=self.registry,
        )
        self._collector: _RuntimeCollector | None = None

    def watch(self, runtime: Runtime) -> None:
        """Report ``runtime``'s gauges and totals at every scrape (idempotent).

        Watching several runtimes reports their sums.
        """
        if self._collector is None:
            self._collector = _RuntimeCollector()
            self.registry.register(self._collector)
        if not any(r is runtime for r in self._collector.runtimes):
            self._collector.runtimes.append(runtime)

    def observe_span(
        self,
        kind: str,
        name: str,
        status: str,
        seconds: float,
        attributes: Mapping[str, Any],
    ) -> None:
        """Record one finished span of ``Telemetry`` (kind ``run``, ``llm`` or ``tool``)."""
        if kind == "tool":
            self.tool_seconds.labels(name, status).observe(seconds)
        elif kind == "llm":
            model = str(attributes.get("model") or "")
            self.llm_seconds.labels(name, model, status).observe(seconds)
            for kind_label, key in (
                ("prompt", "prompt_tokens"),
                ("completion", "completion_tokens"),
            ):
                tokens = attributes.get(key)
                if isinstance(tokens, int) and tokens > 0:
                    self.llm_tokens.labels(name, model, kind_label).inc(tokens)
        elif kind == "run":
            self.run_seconds.labels(status).observe(seconds)

    def refused(self, status: int, error: str) -> None:
        """Count one refusal by the gateway."""
        self.refusals.labels(str(status), error).inc()

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


class _RuntimeCollector:
    """Figures computed from the watched runtimes when the registry is collected."""

    def __init__(self) -> None:
        self.runtimes: list[Runtime] = []

    def collect(self) -> Iterable[Metric]:
        sessions = connections = active = queued = tasks = backlog = 0
        finished = dict.fromkeys(RUN_OUTCOMES, 0)
        published = 0
        tracked = False
        for runtime in self.runtimes:
            stats = runtime.statistics()
            sessions += stats.sessions
            connections += stats.connections
            active += stats.active_runs
            queued += stats.queued_runs
            tasks += stats.tasks
            backlog += sum(s.sequencer.statistics().backlog for s in runtime.manager.sessions())
            # The execution tracker is optional (absent from older runtimes).
            tracker = getattr(runtime, "tracker", None)
            if tracker is not None:
                tracked = True
                for outcome, count in getattr(tracker, "finished_totals", {}).items():
                    finished[outcome] = finished.get(outcome, 0) + count
                published += getattr(tracker, "events_published", 0)
        gauges = (
            (
                "netra_sessions",
                "Live sessions (one per connected or recently active user).",
                sessions,
            ),
            ("netra_connections", "Open client connections.", connections),
            ("netra_runs_active", "Runs executing now.", active),
            ("netra_runs_queued", "Runs accepted and waiting for their thread.", queued),
            (
                "netra_sequencer_backlog",
                "Events waiting in the sessions' sequencer inboxes (sum over sessions).",
                backlog,
            ),
            ("netra_runtime_tasks", "Tasks in the runtime's root nursery.", tasks),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        if tracked:
            runs = CounterMetricFamily(
                "netra_runs_finished",
                "Runs that reached a terminal event, by outcome.",
                labels=["outcome"],
            )
            for outcome, count in finished.items():
                runs.add_metric([outcome], count)
            yield runs
            yield CounterMetricFamily(
                "netra_events_emitted",
                "Events published by every session (each stamped with a seq).",
                value=published,
            )


def metrics_for(runtime: Runtime) -> RuntimeMetrics:
    """The ``RuntimeMetrics`` of ``runtime``'s telemetry, created if it has none, watching it."""
    telemetry = runtime.telemetry
    if telemetry.metrics is None:
        telemetry.metrics = RuntimeMetrics()
    telemetry.metrics.watch(runtime)
    return telemetry.metrics
