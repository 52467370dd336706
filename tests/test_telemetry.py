"""Spans: they end with their ``with`` block whatever ends it, carry our trace ids into
OpenTelemetry, and never stop work (a missing SDK is one warning); failed spans are
logged with their ids, and JSON log lines carry them.

OpenTelemetry spans are read back from an ``InMemorySpanExporter`` behind a
``SimpleSpanProcessor`` (exported as each span ends) on a provider of the test's
own, never the global one.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from strategies import connect

from netra_actors import (
    Config,
    JsonLogFormatter,
    Runtime,
    RuntimeMetrics,
    Telemetry,
    UnifiedTraceContext,
)
from netra_actors._telemetry import install_otel_from_env

BOUND = 600
CALC = "what is 2+3*4?"
CLIENT_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def attrs_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def count(metrics: RuntimeMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --- the span itself ---------------------------------------------------------------------------


async def test_noop_telemetry_yields_a_dict_and_records_nothing() -> None:
    """``Telemetry()`` is the cheap default: spans yield a dict and record nothing."""
    telemetry = Telemetry()
    assert not telemetry.recording
    with telemetry.span("tool", "t", UnifiedTraceContext.new_root()) as late:
        late["status"] = "ok"
    telemetry.events_delivered(3)  # no metrics: nothing to count, no failure


async def test_span_status_follows_what_ends_the_block() -> None:
    """ok by default, the late status when set, error for an exception, cancelled for
    ``trio.Cancelled``: each duration lands in the histogram under that status."""
    metrics = RuntimeMetrics()
    telemetry = Telemetry(metrics=metrics)
    trace = UnifiedTraceContext.new_root()
    with telemetry.span("tool", "t", trace):
        pass
    with telemetry.span("tool", "t", trace) as late:
        late["status"] = "timeout"
    with pytest.raises(ValueError, match="boom"), telemetry.span("tool", "t", trace):
        raise ValueError("boom")
    with trio.CancelScope() as scope, telemetry.span("tool", "t", trace):
        scope.cancel()
        await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    for status in ("ok", "timeout", "error", "cancelled"):
        assert count(metrics, "netra_tool_duration_seconds_count", tool="t", status=status) == 1


async def test_failed_spans_are_logged_with_their_ids(caplog: pytest.LogCaptureFixture) -> None:
    """A span ending in error is logged on ``netra_actors.telemetry`` with trace, span and
    run ids as record attributes; an ok span is not logged."""
    telemetry = Telemetry(metrics=RuntimeMetrics())
    trace = UnifiedTraceContext.new_root()
    caplog.set_level(logging.INFO, logger="netra_actors.telemetry")
    with telemetry.span("tool", "fine", trace, {"run_id": "run_1"}):
        pass
    with telemetry.span("llm", "scripted", trace, {"run_id": "run_1"}) as late:
        late["status"] = "error"
        late["error"] = "the model failed"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "scripted" in record.getMessage()
    assert "the model failed" in record.getMessage()
    assert record.__dict__["trace_id"] == trace.trace_id
    assert record.__dict__["span_id"] == trace.span_id
    assert record.__dict__["run_id"] == "run_1"


def test_json_log_lines_carry_the_ids() -> None:
    """``JsonLogFormatter``: one JSON object with ts, level, logger, message and the ids
    present on the record (absent ones are left out)."""
    record = logging.LogRecord(
        "netra_actors.session", logging.INFO, __file__, 1, "hi %s", ("x",), None
    )
    record.trace_id = "a" * 32
    record.run_id = "run_9"
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "netra_actors.session"
    assert entry["message"] == "hi x"
    assert entry["trace_id"] == "a" * 32
    assert entry["run_id"] == "run_9"
    assert "span_id" not in entry
    assert entry["ts"].endswith("+00:00")


# --- OpenTelemetry export -----------------------------------------------------------------------


async def test_otel_spans_continue_our_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """OTel spans carry our trace id and ``netra.span_id``; the run span hangs under the
    client's span, nested spans under the OTel span of their parent."""
    telemetry = Telemetry(tracer_provider=provider)
    run = UnifiedTraceContext.from_traceparent(CLIENT_PARENT)
    llm = run.child()
    tool = run.child()
    with telemetry.span("run", "demo", run, {"run_id": "run_1", "thread_id": "main"}):
        with telemetry.span("llm", "scripted", llm, {"model": "m"}) as late:
            late["prompt_tokens"] = 7
        with telemetry.span("tool", "calculator", tool, {"run_id": "run_1"}):
            pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"run demo", "llm scripted", "tool calculator"}
    for span, ours in (
        (spans["run demo"], run),
        (spans["llm scripted"], llm),
        (spans["tool calculator"], tool),
    ):
        assert trace_hex(span) == run.trace_id
        assert attrs_of(span)["netra.span_id"] == ours.span_id
        assert attrs_of(span)["netra.status"] == "ok"
    root = spans["run demo"]
    assert root.parent is not None
    assert root.parent.is_remote
    assert f"{root.parent.span_id:016x}" == "b7ad6b7169203331"
    assert root.context is not None
    for child in (spans["llm scripted"], spans["tool calculator"]):
        assert child.parent is not None
        assert child.parent.span_id == root.context.span_id
    assert attrs_of(root)["netra.run_id"] == "run_1"
    assert attrs_of(spans["tool calculator"])["netra.tool_name"] == "calculator"
    assert attrs_of(spans["llm scripted"])["netra.prompt_tokens"] == 7
    assert telemetry.otel is not None
    assert not telemetry.otel.open


async def test_failed_span_has_error_status(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """An exception through a span: OTel status ERROR, the exception recorded."""
    telemetry = Telemetry(tracer_provider=provider)
    with pytest.raises(RuntimeError), telemetry.span("tool", "t", UnifiedTraceContext.new_root()):
        raise RuntimeError("tool broke")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is otel_trace.StatusCode.ERROR
    assert attrs_of(span)["netra.status"] == "error"
    assert [event.name for event in span.events] == ["exception"]


async def test_runtime_exports_llm_and_tool_spans(
    make_config: Callable[..., Config],
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A demo calculator run exports two LLM spans and one tool span in the run's trace,
    with token usage on the LLM spans and the run's ids on the tool span."""
    telemetry = Telemetry.from_config(make_config(otel=True), tracer_provider=provider)
    with trio.fail_after(BOUND):
        async with Runtime(make_config(), telemetry=telemetry) as runtime:
            handle = await runtime.start_run("alice", CALC, traceparent=CLIENT_PARENT)
            events = await handle.collect()
    assert events[-1].type == "agent_completed"
    trace_ids = {event.trace_id for event in events}
    assert trace_ids == {"0af7651916cd43dd8448eb211c80319c"}
    spans = exporter.get_finished_spans()
    llm = [s for s in spans if s.name == "llm scripted"]
    tools = [s for s in spans if s.name == "tool calculator"]
    assert len(llm) == 2
    assert len(tools) == 1
    for span in (*llm, *tools):
        assert trace_hex(span) in trace_ids
        assert attrs_of(span)["netra.status"] == "ok"
    for span in llm:
        assert attrs_of(span)["netra.prompt_tokens"] > 0
        assert "netra.completion_tokens" in attrs_of(span)
    tool = attrs_of(tools[0])
    assert tool["netra.run_id"] == handle.run_id
    assert tool["netra.thread_id"] == "main"
    [executing] = [e for e in events if e.type == "tool_executing"]
    assert tool["netra.call_id"] == executing.data["call_id"]
    assert tool["netra.span_id"] == executing.span_id
    assert telemetry.otel is not None
    assert not telemetry.otel.open


@pytest.mark.parametrize(
    ("text", "waiting_for", "kind", "name"),
    [
        ("sleep 30", "tool_executing", "tool", "sleep"),
        ("stream 100000", "partial_result", "llm", "scripted"),
    ],
)
async def test_cancelled_run_closes_its_spans(
    make_config: Callable[..., Config],
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    text: str,
    waiting_for: str,
    kind: str,
    name: str,
) -> None:
    """A run cancelled in its tool, or in the model's stream, still ends every span it
    opened, with status ``cancelled``."""
    telemetry = Telemetry(metrics=RuntimeMetrics(), tracer_provider=provider)
    with trio.fail_after(30):
        async with Runtime(make_config(), telemetry=telemetry) as runtime:
            handle = await runtime.start_run("bob", text)
            events = []
            async for event in handle.events():
                events.append(event)
                if event.type == waiting_for and [e.type for e in events].count(waiting_for) == 1:
                    await handle.cancel()
    assert events[-1].type == "agent_cancelled"
    assert telemetry.otel is not None
    assert not telemetry.otel.open
    [span] = [s for s in exporter.get_finished_spans() if s.name == f"{kind} {name}"]
    assert span.end_time is not None
    assert attrs_of(span)["netra.status"] == "cancelled"
    assert trace_hex(span) == events[0].trace_id
    assert telemetry.metrics is not None
    if kind == "tool":
        labels = {"tool": name, "status": "cancelled"}
        assert count(telemetry.metrics, "netra_tool_duration_seconds_count", **labels) == 1
    else:
        labels = {"provider": name, "model": "", "status": "cancelled"}
        assert count(telemetry.metrics, "netra_llm_duration_seconds_count", **labels) == 1


# --- without the SDK ------------------------------------------------------------------------------


@pytest.fixture
def no_otel_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``opentelemetry.sdk`` unimportable (a ``None`` entry in ``sys.modules``)."""
    for module in list(sys.modules):
        if module == "opentelemetry.sdk" or module.startswith("opentelemetry.sdk."):
            monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)


async def test_missing_sdk_warns_once_and_runs_go_on(
    make_config: Callable[..., Config],
    no_otel_sdk: None,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``otel`` on without the SDK: one warning, no export, and runs and metrics work."""
    caplog.set_level(logging.WARNING, logger="netra_actors.telemetry")
    config = make_config(otel=True)
    telemetry = Telemetry.from_config(config)
    assert telemetry.otel is None
    assert telemetry.metrics is not None
    warnings = [r for r in caplog.records if "opentelemetry-sdk is not installed" in r.getMessage()]
    assert len(warnings) == 1
    assert install_otel_from_env() is None
    with trio.fail_after(BOUND):
        async with Runtime(config, telemetry=telemetry) as runtime:
            events = await (await runtime.start_run("carol", CALC)).collect()
    assert events[-1].type == "agent_completed"
    labels = {"tool": "calculator", "status": "ok"}
    assert count(telemetry.metrics, "netra_tool_duration_seconds_count", **labels) == 1
    ours = [r for r in caplog.records if r.name == "netra_actors.telemetry"]
    assert len(ours) == 1


async def test_connections_over_memory_transport_count_deliveries(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """``Telemetry.events_delivered`` is fed by connections (a runtime given metrics)."""
    metrics = RuntimeMetrics()
    with trio.fail_after(BOUND):
        async with (
            Runtime(make_config(), telemetry=Telemetry(metrics=metrics)) as runtime,
            trio.open_nursery() as nursery,
        ):
            client = await connect(nursery, runtime, "dave")
            run_id = await client.user_message(CALC)
            await client.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            assert count(metrics, "netra_events_delivered_total") == len(client.events)
            nursery.cancel_scope.cancel()


# --- the command line's provider --------------------------------------------------------------


def test_install_otel_from_env_picks_the_named_exporters(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a global SDK provider, the CLI installs one exporting through the exporters
    ``OTEL_TRACES_EXPORTER`` names; an unknown one is a warning, not a failure."""
    installed: list[Any] = []
    monkeypatch.setattr(otel_trace, "get_tracer_provider", otel_trace.ProxyTracerProvider)
    monkeypatch.setattr(otel_trace, "set_tracer_provider", installed.append)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console, not-an-exporter")
    caplog.set_level(logging.WARNING, logger="netra_actors.telemetry")
    provider = install_otel_from_env()
    try:
        assert isinstance(provider, TracerProvider)
        assert installed == [provider]
        [warning] = caplog.records
        assert "not-an-exporter" in warning.getMessage()
    finally:
        provider.shutdown()
    # An SDK provider already installed (e.g. by opentelemetry-instrument) is kept.
    monkeypatch.setattr(otel_trace, "get_tracer_provider", lambda: provider)
    assert install_otel_from_env() is None
