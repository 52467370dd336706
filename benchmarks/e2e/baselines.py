"""The baselines, each a server process speaking the same protocol subset as netra.

Usage: ``python -m benchmarks.e2e.baselines KIND [--port 0]``; prints
``baseline KIND serving at ws://127.0.0.1:PORT/ws`` once listening.

Every kind answers a connection with ``session_ready`` and each
``user_message`` (``stream N`` or the calculator question) with
``run_accepted`` and then the demo agent's events for it, in netra's exact
frame shape (``wire.demo_events``), ``seq`` gap-free per connection, runs of a
connection one after another. The user comes from the token's ``sub``
(unverified: authentication is not on the per-event path).

- ``trio-ws``, the transport limit: a bare trio-websocket server. The run's
  frames are encoded up front (once each, ``ts`` = encoding time), then sent
  with ``send_message`` one after another. With ``?batch=N`` they are joined
  into ``events`` frames of up to N (netra's rule), so the batched rows have a
  limit too.
- ``asyncio-peer``, what a user would build instead: asyncio and the
  ``websockets`` library, sessions with fan-out (an agent task per run emits
  events one by one into every subscribed connection's queue, a writer task
  per connection sends them). Events are encoded with orjson once each, as
  netra does, so the comparison is about the runtime, not the JSON library.
  Single-event frames only (``batch`` is ignored).
- ``trio-tcp``, the framing-free ceiling: plain trio TCP, newline-delimited
  frames, one ``send_all`` per frame (per ``events`` frame with ``batch``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from urllib.parse import parse_qs, urlsplit

import orjson
import trio

from . import wire

HOST = "127.0.0.1"
KINDS = ("trio-ws", "asyncio-peer", "trio-tcp")


def _params(target: str) -> tuple[str, int]:
    query = parse_qs(urlsplit(target).query)
    user = wire.token_subject(query["token"][0])
    batch = int(query.get("batch", ["1"])[0])
    return user, batch


def _banner(kind: str, url: str) -> None:
    print(f"baseline {kind} serving at {url}", flush=True)


# --- trio-websocket: the transport limit ------------------------------------------------------


async def _trio_ws_handler(request: object) -> None:
    import trio_websocket

    assert isinstance(request, trio_websocket.WebSocketRequest)
    user, batch = _params(request.path)
    ws = await request.accept()
    seq = 0
    await ws.send_message(wire.session_ready(user, batch))
    try:
        while True:
            text = orjson.loads(await ws.get_message())["text"]
            run_id = wire.new_run_id()
            await ws.send_message(wire.run_accepted(run_id))
            frames = wire.encode_run(text, user, seq + 1, run_id)
            seq += len(frames)
            for frame in wire.batched(frames, batch):
                await ws.send_message(frame)
    except trio_websocket.ConnectionClosed:
        pass


async def serve_trio_ws() -> None:
    import trio_websocket

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, _trio_ws_handler, HOST, 0, None
        )
        _banner("trio-ws", f"ws://{HOST}:{server.port}/ws")


# --- plain trio TCP: the framing-free ceiling -------------------------------------------------


async def _tcp_handler(stream: trio.SocketStream) -> None:
    parser = wire.LineParser()
    # The client's first line is its "handshake": the same target as a WebSocket URL.
    user = ""
    batch = 1
    seq = 0
    try:
        while data := await stream.receive_some(65536):
            for _, line in parser.feed(data):
                if not user:
                    user, batch = _params(line.decode())
                    await stream.send_all(wire.session_ready(user, batch).encode() + b"\n")
                    continue
                text = orjson.loads(line)["text"]
                run_id = wire.new_run_id()
                await stream.send_all(wire.run_accepted(run_id).encode() + b"\n")
                frames = wire.encode_run(text, user, seq + 1, run_id)
                seq += len(frames)
                for frame in wire.batched(frames, batch):
                    await stream.send_all(frame.encode() + b"\n")
    except trio.BrokenResourceError:
        pass


async def serve_trio_tcp() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _tcp_handler, 0, host=HOST)
        )
        port = listeners[0].socket.getsockname()[1]
        _banner("trio-tcp", f"tcp://{HOST}:{port}/ws")


# --- asyncio + websockets: the peer a user would build -----------------------------------------


class _PeerSession:
    """One user's stream: ``seq``, the subscribed connections' queues, one run at a time."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.seq = 0
        self.subscribers: set[asyncio.Queue[str]] = set()
        self.run_lock = asyncio.Lock()

    def publish(self, frame: str) -> None:
        for queue in self.subscribers:
            queue.put_nowait(frame)

    async def run(self, text: str, run_id: str) -> None:
        trace_id = wire.random_hex(16)
        async with self.run_lock:
            for kind, data, span in wire.demo_events(text, self.user):
                self.seq += 1
                self.publish(
                    wire.event_frame(kind, self.seq, run_id, time.time(), trace_id, span, data)
                )
                await asyncio.sleep(0)  # an agent's token stream yields between events


async def serve_asyncio_peer() -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    sessions: dict[str, _PeerSession] = {}
    runs: set[asyncio.Task[None]] = set()

    async def writer(ws: ServerConnection, queue: asyncio.Queue[str]) -> None:
        while True:
            await ws.send(await queue.get())

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        user, _batch = _params(ws.request.path)
        session = sessions.get(user) or sessions.setdefault(user, _PeerSession(user))
        queue: asyncio.Queue[str] = asyncio.Queue()
        session.subscribers.add(queue)
        queue.put_nowait(wire.session_ready(user, 1))
        sending = asyncio.create_task(writer(ws, queue))
        try:
            async for message in ws:
                text = orjson.loads(message)["text"]
                run_id = wire.new_run_id()
                queue.put_nowait(wire.run_accepted(run_id))
                task = asyncio.create_task(session.run(text, run_id))
                runs.add(task)
                task.add_done_callback(runs.discard)
        except ConnectionClosed:
            pass
        finally:
            session.subscribers.discard(queue)
            sending.cancel()

    async with serve(handler, HOST, 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        _banner("asyncio-peer", f"ws://{HOST}:{port}/ws")
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    args = parser.parse_args(argv)
    try:
        if args.kind == "asyncio-peer":
            asyncio.run(serve_asyncio_peer())
        elif args.kind == "trio-ws":
            trio.run(serve_trio_ws)
        else:
            trio.run(serve_trio_tcp)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
