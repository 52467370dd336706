"""Prometheus metrics: ``GET /metrics`` parses, its figures follow real runs, and the
bearer token guards it when one is configured.

In-process tests call the gateway's route directly over a runtime driven by
memory transports (virtual time, ``wait_all_tasks_blocked`` before asserting);
the network tests (real clock, 127.0.0.1) speak HTTP to a real listener.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from strategies import connect, types_of
from wsclient import connect as ws_connect
from wsclient import http_exchange, http_get, served

from netra_actors import Config, Gateway, HttpRequest, Runtime
from netra_actors.testing import check_lifecycle

#: Virtual seconds for in-process tests; real seconds (generous) for network tests.
BOUND = 600
NET_TIMEOUT = 30
CALC = "what is 2+3*4?"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, keyed by sample name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(gateway: Gateway, **headers: str) -> Samples:
    """``GET /metrics`` through the gateway's route (no socket)."""
    route = gateway.routes[("GET", "/metrics")]
    response = await route(HttpRequest("GET", "/metrics", headers))
    assert response.status == 200, response
    assert response.content_type == prometheus_client.CONTENT_TYPE_LATEST
    return parse(response.body.decode())


async def test_demo_run_moves_the_counters(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """After a demo calculator run: runs finished, events emitted and delivered, one tool
    call and two LLM calls are counted, and the gauges show the live connection."""
    config = make_config()
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime, trio.open_nursery() as nursery:
            gateway = Gateway(runtime, config)
            before = await scrape(gateway)
            assert value(before, "netra_sessions") == 0
            assert value(before, "netra_connections") == 0
            assert value(before, "netra_events_delivered_total") == 0

            client = await connect(nursery, runtime, "alice")
            run_id = await client.user_message(CALC)
            await client.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            events = client.run_events(run_id)
            check_lifecycle(events)
            assert types_of(events)[-1] == "agent_completed"

            after = await scrape(gateway)
            assert value(after, "netra_sessions") == 1
            assert value(after, "netra_connections") == 1
            assert value(after, "netra_runs_active") == 0
            assert value(after, "netra_runs_queued") == 0
            assert value(after, "netra_sequencer_backlog") == 0
            assert value(after, "netra_runs_finished_total", outcome="completed") == 1
            assert value(after, "netra_runs_finished_total", outcome="failed") == 0
            assert value(after, "netra_events_emitted_total") == len(events)
            assert value(after, "netra_events_delivered_total") == len(client.events)
            assert (
                value(after, "netra_tool_duration_seconds_count", tool="calculator", status="ok")
                == 1
            )
            llm = {"provider": "scripted", "model": "", "status": "ok"}
            assert value(after, "netra_llm_duration_seconds_count", **llm) == 2
            prompt = value(
                after, "netra_llm_tokens_total", provider="scripted", model="", kind="prompt"
            )
            assert prompt is not None
            assert prompt > 0
            await client.close()
            nursery.cancel_scope.cancel()


async def test_every_connection_counts_its_deliveries(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Two connections of one user each receive the run: delivered counts both copies."""
    config = make_config()
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime, trio.open_nursery() as nursery:
            gateway = Gateway(runtime, config)
            first = await connect(nursery, runtime, "bob")
            second = await connect(nursery, runtime, "bob")
            run_id = await first.user_message("stream 20")
            await first.wait_terminal(run_id)
            await second.wait_terminal(run_id)
            await trio.testing.wait_all_tasks_blocked()
            samples = await scrape(gateway)
            delivered = len(first.events) + len(second.events)
            assert value(samples, "netra_events_delivered_total") == delivered
            assert value(samples, "netra_events_emitted_total") == len(first.run_events(run_id))
            assert value(samples, "netra_connections") == 2
            nursery.cancel_scope.cancel()


async def test_gauges_show_an_active_run_then_its_cancellation(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A run in a long tool is active in the gauges; once cancelled it is counted as such,
    and its tool call as ``cancelled``."""
    config = make_config()
    with trio.fail_after(BOUND):
        async with Runtime(config) as runtime:
            gateway = Gateway(runtime, config)
            handle = await runtime.start_run("carol", "sleep 30")
            async for event in handle.events():
                if event.type == "tool_executing":
                    await trio.testing.wait_all_tasks_blocked()
                    during = await scrape(gateway)
                    assert value(during, "netra_runs_active") == 1
                    assert value(during, "netra_sessions") == 1
                    await handle.cancel()
            await trio.testing.wait_all_tasks_blocked()
            after = await scrape(gateway)
            assert value(after, "netra_runs_active") == 0
            assert value(after, "netra_runs_finished_total", outcome="cancelled") == 1
            status = {"tool": "sleep", "status": "cancelled"}
            assert value(after, "netra_tool_duration_seconds_count", **status) == 1


async def test_each_runtime_has_its_own_registry(make_config: Callable[..., Config]) -> None:
    """Two runtimes in one process never share figures, nor touch the default registry."""
    config = make_config()
    with trio.fail_after(BOUND):
        async with Runtime(config) as one, Runtime(config) as two:
            first, second = Gateway(one, config), Gateway(two, config)
            assert first.metrics.registry is not second.metrics.registry
            await (await one.start_run("dave", CALC)).collect()
            assert value(await scrape(first), "netra_runs_finished_total", outcome="completed") == 1
            assert (
                value(await scrape(second), "netra_runs_finished_total", outcome="completed") == 0
            )
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "netra_" not in default


# --- over real sockets ---------------------------------------------------------------------------


def _get(port: int, path: str, authorization: str | None = None) -> bytes:
    auth = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n".encode()


@pytest.mark.network
async def test_metrics_endpoint_over_http(make_config: Callable[..., Config]) -> None:
    """Open by default: ``GET /metrics`` answers 200 in the text format, and counts a
    run made over a real WebSocket."""
    config = make_config()
    with trio.fail_after(NET_TIMEOUT):
        async with served(config) as server:
            async with ws_connect(server.url_for("erin")) as client:
                await client.ready()
                accepted, events = await client.run(CALC)
                await client.ping()  # the writer has passed the events' batch
                answer = await http_get(server.port, "/metrics")
            assert answer.status == 200
            assert answer.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
            samples = parse(answer.body.decode())
            assert value(samples, "netra_runs_finished_total", outcome="completed") == 1
            assert value(samples, "netra_events_delivered_total") == len(client.events())
            assert value(samples, "netra_connections") == 1
            assert events[-1]["type"] == "agent_completed"
            assert accepted["run_id"] == events[-1]["run_id"]


@pytest.mark.network
async def test_metrics_token_is_required_when_configured(
    make_config: Callable[..., Config],
) -> None:
    """With ``metrics_token``: 401 (JSON body, ``WWW-Authenticate: Bearer``) without it or
    with a wrong one, 200 with it; refusals are counted."""
    config = make_config(metrics_token="scrape-secret")
    with trio.fail_after(NET_TIMEOUT):
        async with served(config) as server:
            port = server.port
            for authorization in (None, "Bearer wrong", "Basic scrape-secret", "Bearer"):
                answer = await http_exchange(port, _get(port, "/metrics", authorization))
                assert answer.status == 401, authorization
                assert answer.headers["www-authenticate"] == "Bearer"
                assert answer.json()["error"] == "unauthorized"
                assert "message" in answer.json()
            answer = await http_exchange(port, _get(port, "/metrics", "Bearer scrape-secret"))
            assert answer.status == 200
            samples = parse(answer.body.decode())
            refused = value(
                samples, "netra_http_refusals_total", status="401", error="unauthorized"
            )
            assert refused == 4
            # /healthz stays open.
            assert (await http_get(port, "/healthz")).status == 200
