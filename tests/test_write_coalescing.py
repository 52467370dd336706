"""Write coalescing: a connection writes a burst of events with one ``send_texts`` (one
system call over a socket) instead of one write per event, without changing what the
client receives: the same frames, in the same order, one event per frame.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import trio
import trio.testing
import wsclient

from netra_actors import Config, Runtime, TransportClosed
from netra_actors._transport import CoalescingTransport
from netra_actors.testing import check_lifecycle

BOUND = 600


class RecordingTransport:
    """A coalescing transport that records each write (a list of frames) and never
    receives anything until closed."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        #: Virtual time of each write.
        self.times: list[float] = []
        self._wrote = trio.Event()
        self.closed = trio.Event()
        self.code: int | None = None

    async def send_text(self, text: str) -> None:
        await self.send_texts([text])

    async def send_texts(self, texts: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed.is_set():
            raise TransportClosed(self.code)
        self.writes.append(list(texts))
        self.times.append(trio.current_time())
        self._wrote.set()
        self._wrote = trio.Event()

    async def wait_for_seq(self, seq: int) -> None:
        """Wait until the event ``seq`` has been written."""
        while not any(json.loads(frame).get("seq") == seq for frame in self.writes[-1]):
            await self._wrote.wait()

    async def receive(self) -> str | bytes:
        await self.closed.wait()
        raise TransportClosed(self.code)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await trio.lowlevel.checkpoint()
        self.code = self.code or code
        self.closed.set()

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        await self.close(1006)

    @property
    def frames(self) -> list[str]:
        return [frame for write in self.writes for frame in write]


async def _stream_through(
    config: Config, text: str
) -> tuple[RecordingTransport, dict[int, float], dict[int, float]]:
    """The transport; when each event was published (seen by a run handle) and written."""
    transport = RecordingTransport()
    assert isinstance(transport, CoalescingTransport)
    published: dict[int, float] = {}
    async with Runtime(config) as runtime, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: runtime.serve_connection("alice", transport))
        await trio.testing.wait_all_tasks_blocked()
        handle = await runtime.start_run("alice", text)
        async for event in handle.events():
            published[event.seq] = trio.current_time()
        await transport.wait_for_seq(max(published))
        await transport.close()
    written = {
        json.loads(frame)["seq"]: at
        for at, write in zip(transport.times, transport.writes, strict=True)
        for frame in write
        if '"seq"' in frame
    }
    return transport, published, written


async def test_a_burst_goes_out_in_few_writes_with_every_frame_intact(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """``stream 300`` with a 1 ms linger: far fewer writes than events, several frames in
    some writes, and the frames are still one event each, gap-free and lawful."""
    with trio.fail_after(BOUND):
        transport, published, written = await _stream_through(
            make_config(write_linger=0.001), "stream 300"
        )
    frames = [json.loads(f) for f in transport.frames]
    assert frames[0]["type"] == "session_ready"
    events = [f for f in frames if "seq" in f]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    check_lifecycle(frames)
    assert max(len(write) for write in transport.writes) > 1
    assert len(transport.writes) < len(events) / 2
    # No event waited for its write more than two lingers (one it just missed, one it
    # was taken in).
    assert max(written[seq] - published[seq] for seq in published) <= 2 * 0.001 + 1e-9


async def test_an_event_after_a_quiet_spell_is_written_at_once(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A run with a 3 s tool: the ``tool_completed`` that ends the quiet spell is written
    the moment it is published (no linger: nothing suggests more is coming)."""
    with trio.fail_after(BOUND):
        transport, published, written = await _stream_through(
            make_config(write_linger=0.001), "sleep 3"
        )
    frames = [json.loads(f) for f in transport.frames]
    check_lifecycle(frames)
    completed = next(f["seq"] for f in frames if f["type"] == "tool_completed")
    assert written[completed] == published[completed]


async def test_coalesced_frames_over_a_real_socket_arrive_as_separate_messages(
    live_server: object,
) -> None:
    """Over trio-websocket, a resume of a long stream (a backlog, written with
    ``send_texts``) reaches a plain WebSocket client as one message per event, in order."""
    server = live_server
    runtime: Runtime = server.runtime  # type: ignore[attr-defined]
    events = await (await runtime.start_run("alice", "stream 200")).collect()
    url = server.url_for("alice") + "&after_seq=0"  # type: ignore[attr-defined]
    with trio.fail_after(30):
        async with wsclient.connect(url) as ws:
            received = []
            while len(received) < len(events) + 1:
                received.append(json.loads(await ws.ws.get_message()))
    assert received[0]["type"] == "session_ready"
    assert [f["seq"] for f in received[1:]] == [e.seq for e in events]
    assert received[1:] == [json.loads(e.frame) for e in events]
