"""The connection actor: one per open WebSocket, a child of its user's session.

Two tasks: the reader drains every incoming frame (so transport-level pings
keep being answered) and turns it into requests to the session; the writer is
the only task that sends on the transport, from the connection's subscription
(direct replies, then the session's events in ``seq`` order). Bad input gets a
typed ``error`` frame and the connection stays usable. When either task ends,
the other is cancelled and the transport is closed with a code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ._exceptions import ProtocolError, RuntimeClosed, TransportClosed
from ._messages import CancelRequest, Ping, UserMessage
from ._protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    PONG_FRAME,
    error_frame,
    parse_client_frame,
    run_accepted_frame,
    session_ready_frame,
)
from ._sequencer import Subscription, SubscriptionLagged
from ._trace import UnifiedTraceContext
from ._transport import Transport

if TYPE_CHECKING:
    from ._session import Session

logger = logging.getLogger("netra_actors.connection")

#: Close code for a connection whose cursor fell out of the replay window.
CLOSE_LAGGING = 4008


class Connection:
    """One client connection of a session (state owned by its two tasks only)."""

    def __init__(
        self,
        session: Session,
        transport: Transport,
        *,
        connection_id: str,
        traceparent: str | None = None,
    ) -> None:
        self.session = session
        self.transport = transport
        self.connection_id = connection_id
        self.traceparent = traceparent
        self.subscription: Subscription | None = None
        self.done = trio.Event()
        self.close_code: int | None = None

    async def run(self) -> None:
        """Serve the connection until the client leaves or the session ends.

        On cancellation the transport is closed (1001) without waiting for the peer.
        """
        session = self.session
        # The cursor and last_seq are read in the same step, so the client receives
        # every event with seq > last_seq and nothing before it.
        sub = self.subscription = session.subscribe()
        sub.push_direct(session_ready_frame(session.session_id, session.user_id, sub.cursor))
        session.connections += 1
        code = CLOSE_GOING_AWAY
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, nursery.cancel_scope)
                code = await self._writer(sub)
                nursery.cancel_scope.cancel()
        except Exception:
            logger.exception("connection %s failed", self.connection_id)
            code = CLOSE_INTERNAL
        finally:
            session.connections -= 1
            sub.close()
            self.close_code = code
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = trio.current_time() + 2
                try:
                    await self.transport.close(code)
                except Exception:
                    logger.debug("close of %s failed", self.connection_id, exc_info=True)
            self.done.set()

    async def _writer(self, sub: Subscription) -> int:
        """Send direct frames and events in order; the close code when the stream ends."""
        try:
            while True:
                batch = await sub.next_batch()
                if batch is None:
                    return CLOSE_GOING_AWAY
                direct, events = batch
                for frame in direct:
                    await self.transport.send_text(frame)
                for event in events:
                    await self.transport.send_text(event.frame)
        except TransportClosed as exc:
            return exc.code or 1000
        except SubscriptionLagged:
            return CLOSE_LAGGING

    async def _reader(self, done: trio.CancelScope) -> None:
        assert self.subscription is not None
        reply = self.subscription.push_direct
        try:
            while True:
                message = await self.transport.receive()
                try:
                    await self._handle(message, reply)
                except ProtocolError as exc:
                    reply(error_frame(exc.code, str(exc), exc.client_msg_id))
                except RuntimeClosed as exc:
                    # The session is ending: the writer flushes its last events and closes.
                    reply(error_frame("unavailable", str(exc)))
                except Exception as exc:
                    logger.exception("frame from %s failed", self.connection_id)
                    reply(error_frame("internal", f"internal error: {type(exc).__name__}"))
        except TransportClosed:
            pass
        # The client is gone (or the session is): nothing more to write.
        done.cancel()

    async def _handle(self, message: str | bytes, reply: Callable[[str], None]) -> None:
        match parse_client_frame(message):
            case UserMessage() as msg:
                trace = UnifiedTraceContext.from_traceparent(msg.traceparent or self.traceparent)
                admission = await self.session.start_run(
                    msg.text, thread_id=msg.thread_id, client_msg_id=msg.client_msg_id, trace=trace
                )
                if admission.accepted:
                    reply(
                        run_accepted_frame(admission.run_id, admission.thread_id, msg.client_msg_id)
                    )
                else:
                    raise RuntimeClosed(admission.message or "run refused")
            case CancelRequest(run_id=run_id):
                outcome = await self.session.cancel_run(run_id, "client")
                if outcome.state == "not_found":
                    raise ProtocolError("not_found", f"no queued or active run {run_id!r}")
            case Ping():
                reply(PONG_FRAME)
