"""The trio-websocket transport writes its text frames itself when it may: exactly the bytes
wsproto would write, and wsproto's own framing wherever that is not certain (a client end,
a negotiated extension, a connection no longer open)."""

from __future__ import annotations

import types
from functools import partial

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import LocalProtocolError

from netra_actors import TrioWebSocketTransport
from netra_actors._transport import _text_frame


def _pair(*, deflate: bool = False) -> tuple[WSConnection, WSConnection]:
    """``(server, client)``: wsproto ends after their handshake (permessage-deflate if asked)."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    extensions = [PerMessageDeflate()] if deflate else []
    server.receive_data(client.send(Request(host="localhost", target="/ws", extensions=extensions)))
    list(server.events())
    client.receive_data(server.send(AcceptConnection(extensions=extensions)))
    list(client.events())
    return server, client


def _server_end(*, deflate: bool = False) -> WSConnection:
    return _pair(deflate=deflate)[0]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
def test_own_frames_are_byte_for_byte_what_wsproto_writes(size: int, char: str) -> None:
    """Every length encoding (7-bit, 16-bit, 64-bit), at and across each boundary, for 1- to 4-byte UTF-8 characters."""
    text = char * size
    assert _text_frame(text) == _server_end().send(TextMessage(data=text))


def test_frames_are_written_by_wsproto_for_a_client_end_or_an_extension() -> None:
    """Only a server end without extensions writes its own frames: a client must mask them, permessage-deflate compresses them."""
    assert TrioWebSocketTransport(types.SimpleNamespace(_wsproto=_server_end()))._plain is not None  # type: ignore[arg-type]
    deflating = types.SimpleNamespace(_wsproto=_server_end(deflate=True))
    assert TrioWebSocketTransport(deflating)._plain is None  # type: ignore[arg-type]
    client = WSConnection(ConnectionType.CLIENT)
    assert TrioWebSocketTransport(types.SimpleNamespace(_wsproto=client))._plain is None  # type: ignore[arg-type]


async def test_a_closing_connection_refuses_data_as_wsproto_does() -> None:
    """Once the peer's close frame is in (wsproto no longer OPEN), the transport does not write a data frame of its own: wsproto refuses it, as before."""
    server, client = _pair()
    lock = trio.StrictFIFOLock()
    written: list[bytes] = []

    class Stream:
        async def send_all(self, data: bytes) -> None:
            written.append(data)

    ws = types.SimpleNamespace(_wsproto=server, _stream_lock=lock, _stream=Stream(), closed=None)
    transport = TrioWebSocketTransport(ws)  # type: ignore[arg-type]
    await transport.send_texts(["one", "two"])
    assert written == [_text_frame("one") + _text_frame("two")]
    server.receive_data(client.send(CloseConnection(code=1000)))
    assert [type(e) for e in server.events()] == [CloseConnection]
    with pytest.raises(LocalProtocolError):
        await transport.send_texts(["three"])
    assert server.send(CloseConnection(code=1000))  # wsproto can still answer the close
    assert len(written) == 1


async def test_frames_of_every_size_arrive_intact_over_a_real_socket() -> None:
    """A trio-websocket client on 127.0.0.1 reads what ``send_texts`` wrote in one write: short, 16-bit and 64-bit lengths, non-ASCII."""
    texts = ["héllo", "x" * 200, "€" * 30_000, "y" * 70_000, ""]

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        transport = TrioWebSocketTransport(ws)
        assert transport._plain is not None
        await transport.send_texts(texts)
        await ws.get_message()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context=None)
            )
            async with trio_websocket.open_websocket(
                "127.0.0.1", server.port, "/", use_ssl=False
            ) as client:
                received = [await client.get_message() for _ in texts]
                await client.send_message("done")
            nursery.cancel_scope.cancel()

    assert received == texts
