"""Observability: spans for runs, LLM calls and tool calls; their metrics, export and logs.

One ``Telemetry`` object per runtime. The runtime calls ``span`` around each
unit of work with that unit's ``UnifiedTraceContext``; the span ends exactly
when the ``with`` block ends, including on cancellation, so a cancelled or
abandoned run still closes its spans. A span that ends records:

- its duration in the Prometheus histograms of ``metrics`` (a ``RuntimeMetrics``);
- an OpenTelemetry span, when export is on and the SDK is installed, in *our*
  trace (the OTel trace id is ours; our span id is the attribute ``netra.span_id``);
- a log record on ``netra_actors.telemetry`` when it failed (status ``error``,
  ``timeout``, ``failed`` or ``timed_out``), carrying ``trace_id``, ``span_id``
  and the run's ids as extras.

``Telemetry()`` with neither metrics nor export records nothing and costs one
generator per span. ``JsonLogFormatter`` writes one JSON object per log line.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
import trio

from ._metrics import RuntimeMetrics
from ._trace import UnifiedTraceContext

if TYPE_CHECKING:
    from ._config import Config

logger = logging.getLogger("netra_actors.telemetry")

SpanKind = Literal["run", "llm", "tool"]

#: Record attributes that ``JsonLogFormatter`` writes when present (and that failed
#: spans put on their log records).
LOG_FIELDS = ("trace_id", "span_id", "run_id", "session_id", "user_id")

#: Statuses that mark a span as failed (the run vocabulary's too: failed, timed_out).
_FAILED = frozenset({"error", "timeout", "failed", "timed_out"})
_INSTRUMENTATION = "netra_actors"


def span_status(exc: BaseException) -> str:
    """The status of a span that ``exc`` ends: ``cancelled`` for cancellation, else ``error``.

    ``GeneratorExit`` counts as cancellation: it is how an async generator
    (a streamed LLM call) learns that its consumer stopped, e.g. because the
    run was cancelled.
    """
    if isinstance(exc, trio.Cancelled | GeneratorExit):
        return "cancelled"
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split((trio.Cancelled, GeneratorExit))[1]
        return "cancelled" if rest is None else "error"
    return "error"


class Telemetry:
    """Receives the runtime's spans: metrics, optional OpenTelemetry export, failure logs.

    Args:
        metrics: where span durations go (``None``: no metrics). The gateway
            creates one when it serves ``/metrics`` for a runtime without.
        otel: export spans with OpenTelemetry (default: when ``tracer_provider``
            is given). Needs ``opentelemetry-api`` and ``opentelemetry-sdk``;
            without them one warning is logged and nothing is exported.
        tracer_provider: the OTel ``TracerProvider`` to export through
            (default: the globally configured one).
    """

    def __init__(
        self,
        *,
        metrics: RuntimeMetrics | None = None,
        otel: bool | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.metrics = metrics
        if otel is None:
            otel = tracer_provider is not None
        self.otel = _OTelExport.load(tracer_provider) if otel else None

    @classmethod
    def from_config(cls, config: Config, *, tracer_provider: Any = None) -> Telemetry:
        """Metrics always; OpenTelemetry export when ``config.otel``."""
        return cls(metrics=RuntimeMetrics(), otel=config.otel, tracer_provider=tracer_provider)

    @property
    def recording(self) -> bool:
        """Whether spans record anything (metrics or export)."""
        return self.metrics is not None or self.otel is not None

    def events_delivered(self, count: int) -> None:
        """Count ``count`` events sent to one connection."""
        if self.metrics is not None:
            self.metrics.events_delivered.inc(count)

    @contextlib.contextmanager
    def span(
        self,
        kind: SpanKind,
        name: str,
        trace: UnifiedTraceContext,
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Time the ``with`` block as one span of ``trace``; yields a dict for late attributes
        (e.g. ``status``) that the span records when it ends.

        The status is ``cancelled`` when cancellation (``trio.Cancelled``, or
        ``GeneratorExit`` in an async generator) leaves the block, ``error``
        for an exception, else the late ``status`` (default ``ok``). Recording
        never raises: a failure to record is logged, the work goes on.
        """
        late: dict[str, Any] = {}
        if self.metrics is None and self.otel is None:
            yield late
            return
        started = time.perf_counter()
        exported = (
            self._guard(self.otel.start, kind, name, trace, attributes) if self.otel else None
        )
        status: str | None = None
        failure: BaseException | None = None
        try:
            yield late
        except BaseException as exc:
            status, failure = span_status(exc), exc
            raise
        finally:
            seconds = time.perf_counter() - started
            status = status or str(late.get("status") or "ok")
            merged = {**attributes, **late} if attributes else late
            if self.metrics is not None:
                self._guard(self.metrics.observe_span, kind, name, status, seconds, merged)
            if exported is not None and self.otel is not None:
                self._guard(self.otel.end, exported, trace, status, late, failure)
            if status in _FAILED:
                _log_failure(kind, name, trace, status, merged)

    @staticmethod
    def _guard(record: Any, *args: Any) -> Any:
        try:
            return record(*args)
        except Exception:
            # Telemetry must never fail the work it observes.
            logger.exception("telemetry could not record a span")
            return None


def _log_failure(
    kind: str, name: str, trace: UnifiedTraceContext, status: str, attributes: Mapping[str, Any]
) -> None:
    extra: dict[str, Any] = {"trace_id": trace.trace_id, "span_id": trace.span_id}
    for key in ("run_id", "session_id", "user_id"):
        if attributes.get(key) is not None:
            extra[key] = attributes[key]
    error = attributes.get("error")
    # A failing tool is ordinary model feedback; a failing run or LLM call is not.
    logger.log(
        logging.INFO if kind == "tool" else logging.WARNING,
        "%s %s ended with status %s%s",
        kind,
        name,
        status,
        f": {error}" if error else "",
        extra=extra,
    )


class _OTelExport:
    """Starts and ends OpenTelemetry spans that continue our traces.

    An OTel span gets its span id from the SDK, so each span is started under
    a parent context carrying our trace id: the OTel span of our parent span
    while it is open (so the exported tree is connected), else a remote
    placeholder with our ``parent_span_id`` (the client's span, from its
    ``traceparent``) or, for a root span, our own ``span_id``.
    """

    def __init__(self, api: Any, tracer: Any) -> None:
        self.api = api
        self.tracer = tracer
        #: The OTel span context of each open span, by our span id.
        self.open: dict[str, Any] = {}

    @classmethod
    def load(cls, tracer_provider: Any = None) -> _OTelExport | None:
        """The exporter, or ``None`` (with one warning) when the SDK is not installed."""
        try:
            api = importlib.import_module("opentelemetry.trace")
            importlib.import_module("opentelemetry.sdk.trace")
        except ImportError:
            logger.warning(
                "OpenTelemetry export is on but opentelemetry-sdk is not installed "
                "(pip install 'netra-actors[otel]'); spans are not exported"
            )
            return None
        from . import __version__

        provider = tracer_provider if tracer_provider is not None else api.get_tracer_provider()
        return cls(api, provider.get_tracer(_INSTRUMENTATION, __version__))

    def start(
        self,
        kind: str,
        name: str,
        trace: UnifiedTraceContext,
        attributes: Mapping[str, Any] | None,
    ) -> Any:
        api = self.api
        parent = self.open.get(trace.parent_span_id) if trace.parent_span_id else None
        if parent is None:
            flags = api.TraceFlags(
                api.TraceFlags.SAMPLED if trace.sampled else api.TraceFlags.DEFAULT
            )
            parent = api.SpanContext(
                int(trace.trace_id, 16),
                int(trace.parent_span_id or trace.span_id, 16),
                is_remote=True,
                trace_flags=flags,
            )
        values: dict[str, Any] = {
            "netra.kind": kind,
            "netra.name": name,
            "netra.span_id": trace.span_id,
        }
        if trace.parent_span_id:
            values["netra.parent_span_id"] = trace.parent_span_id
        if kind == "tool":
            values["netra.tool_name"] = name
        elif kind == "llm":
            values["netra.provider"] = name
        values.update(_otel_attributes(attributes or {}))
        span = self.tracer.start_span(
            f"{kind} {name}",
            context=api.set_span_in_context(api.NonRecordingSpan(parent)),
            kind=api.SpanKind.CLIENT if kind == "llm" else api.SpanKind.INTERNAL,
            attributes=values,
        )
        self.open[trace.span_id] = span.get_span_context()
        return span

    def end(
        self,
        span: Any,
        trace: UnifiedTraceContext,
        status: str,
        late: Mapping[str, Any],
        failure: BaseException | None,
    ) -> None:
        self.open.pop(trace.span_id, None)
        try:
            span.set_attributes({**_otel_attributes(late), "netra.status": status})
            if isinstance(failure, Exception):
                span.record_exception(failure)
            if status in _FAILED:
                error = late.get("error")
                span.set_status(
                    self.api.Status(self.api.StatusCode.ERROR, str(error) if error else status)
                )
        finally:
            span.end()


def _otel_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Our attributes as OTel ones: ``netra.<key>`` (dotted keys kept), scalar values."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        name = key if "." in key else f"netra.{key}"
        out[name] = value if isinstance(value, str | bool | int | float) else str(value)
    return out


def install_otel_from_env() -> Any:
    """For the command line: install an SDK ``TracerProvider`` configured by ``OTEL_*``.

    Does nothing (returns ``None``) when a provider is already installed (e.g.
    by ``opentelemetry-instrument``) or the SDK is missing. Otherwise exports
    through the exporters ``OTEL_TRACES_EXPORTER`` names (default ``otlp``,
    from the ``opentelemetry-exporter-otlp`` package; ``console``; ``none``),
    each configured by its own ``OTEL_EXPORTER_*`` variables, with the resource
    of ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``. Returns the
    provider, to ``shutdown()`` (flush) at exit.
    """
    try:
        api = importlib.import_module("opentelemetry.trace")
        sdk = importlib.import_module("opentelemetry.sdk.trace")
        export = importlib.import_module("opentelemetry.sdk.trace.export")
    except ImportError:
        return None  # Telemetry logs the warning
    if isinstance(api.get_tracer_provider(), sdk.TracerProvider):
        return None
    provider = sdk.TracerProvider()
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
        name = name.strip().lower()
        if not name or name == "none":
            continue
        found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            logger.warning(
                "OpenTelemetry exporter %r is not installed (for otlp: pip install "
                "opentelemetry-exporter-otlp); its spans are dropped",
                name,
            )
            continue
        exporter = next(iter(found)).load()()
        provider.add_span_processor(export.BatchSpanProcessor(exporter))
    api.set_tracer_provider(provider)
    return provider


# --- logs ------------------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, then the
    ``LOG_FIELDS`` the record carries (``extra=``), and ``exc_info`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in LOG_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()
