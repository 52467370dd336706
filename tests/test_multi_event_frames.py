"""Multi-event frames (``?batch=N``): a backlog goes out as ``events`` frames carrying
several events each, with the same events, order and lifecycle as one event per frame.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import wsclient
from strategies import MemoryClient

from netra_actors import Config, Runtime, UnifiedTraceContext, client
from netra_actors._connection import _batched
from netra_actors._messages import EmitEvent
from netra_actors._protocol import MAX_BATCH_CHARS
from netra_actors._sequencer import stamp
from netra_actors._transport import memory_transport_pair
from netra_actors.testing import check_lifecycle

BOUND = 600


async def _resume_all(
    runtime: Runtime, nursery: trio.Nursery, batch: int, last_seq: int
) -> MemoryClient:
    """A connection of alice that resumes from seq 0 and has read up to ``last_seq``."""
    server_end, client_end = memory_transport_pair()
    reader = MemoryClient(client_end, "alice")
    nursery.start_soon(
        lambda: runtime.serve_connection("alice", server_end, after_seq=0, batch=batch)
    )
    nursery.start_soon(reader.read_forever)
    await reader.wait_for(
        lambda f: (
            f.get("seq") == last_seq
            or (f["type"] == "events" and f["events"][-1]["seq"] == last_seq)
        )
    )
    return reader


def _unwrapped(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for frame in frames:
        if frame["type"] == "events":
            events.extend(frame["events"])
        elif "seq" in frame:
            events.append(frame)
    return events


@pytest.mark.parametrize("batch", [1, 2, 7, 64, 1000])
async def test_a_backlog_arrives_in_frames_of_at_most_batch_events(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock, batch: int
) -> None:
    """Resuming a 60-event stream: with ``batch`` N the events come in ``events`` frames of
    2..N events (never with ``batch`` 1), unwrapped they are exactly the stream, and the
    frames as received pass the lifecycle checker."""
    with trio.fail_after(BOUND):
        async with Runtime(make_config()) as runtime, trio.open_nursery() as nursery:
            stream = await (await runtime.start_run("alice", "stream 50")).collect()
            reader = await _resume_all(runtime, nursery, batch, stream[-1].seq)
            await reader.close()
            nursery.cancel_scope.cancel()
    ready = reader.frames[0]
    assert ready["type"] == "session_ready"
    assert ready.get("batch") == (batch if batch > 1 else None)
    multi = [f for f in reader.frames if f["type"] == "events"]
    if batch == 1:
        assert not multi
    else:
        assert multi
        assert all(2 <= len(f["events"]) <= batch for f in multi)
    assert _unwrapped(reader.frames) == [json.loads(e.frame) for e in stream]
    check_lifecycle(reader.frames)


def test_batches_respect_the_size_cap_and_never_wrap_a_lone_event() -> None:
    """Events bigger than a quarter of the cap: at most a few per frame; one event alone is
    sent as itself; concatenated, the frames hold every event in order."""
    trace = UnifiedTraceContext.new_root()
    big = "x" * (MAX_BATCH_CHARS // 4)
    events = [
        stamp(EmitEvent("partial_result", "r", "main", trace, {"text": big}), seq, 1.0)
        for seq in range(1, 11)
    ]
    frames = list(_batched([e.frame for e in events], 1000))
    assert all(len(frame) <= MAX_BATCH_CHARS + 200 for frame in frames)
    assert len(frames) > 2
    decoded = [json.loads(frame) for frame in frames]
    assert _unwrapped(decoded) == [json.loads(e.frame) for e in events]
    assert list(_batched([events[0].frame], 1000)) == [events[0].frame]


async def test_the_client_library_unwraps_multi_event_frames(live_server: Any) -> None:
    """``client.connect(..., batch=N)`` asks for batches and still yields one event at a time,
    de-duplicated by seq; the handshake's ``session_ready`` confirms N."""
    token = live_server.token("batcher")
    with trio.fail_after(30):
        async with client.connect(live_server.url, token, batch=32) as conn:
            frames: list[dict[str, Any]] = []
            async with aclosing(conn.frames()) as incoming:
                await conn.send_message("stream 40")
                async for frame in incoming:
                    frames.append(frame)
                    if frame["type"] == "agent_completed":
                        break
                # Everything again from the start: a backlog, so the server batches it
                # (the client drops what it already has); then a new run.
                await conn.resume(0)
                await conn.send_message("stream 3")
                async for frame in incoming:
                    frames.append(frame)
                    if frame["type"] == "agent_completed":
                        break
    assert frames[0]["type"] == "session_ready"
    assert frames[0]["batch"] == 32
    assert not [f for f in frames if f["type"] == "events"]
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == sorted(set(seqs))
    check_lifecycle(frames)


@pytest.mark.parametrize("value", ["0", "1001", "x", "-1", "2.5"])
async def test_a_bad_batch_is_refused_at_the_handshake(live_server: Any, value: str) -> None:
    """``batch`` must be an integer 1-1000: anything else gets 400 ``bad_request``."""
    token = live_server.token("bad-batch")
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with wsclient.connect(f"{live_server.url}?token={token}&batch={value}"):
            pass
    assert refused.value.status_code == 400
    assert json.loads(refused.value.body or b"{}")["error"] == "bad_request"
