"""The connection actor: one per open WebSocket, a child of its user's session.

Two tasks. The reader drains every incoming frame (so transport-level pings
keep being answered) and turns it into requests to the session; after
``heartbeat_interval`` seconds without a frame from the peer it pings it, and
aborts the connection if within ``heartbeat_timeout`` no pong came and the peer
took delivery of nothing we sent (a pong queued behind a backlog the client is
reading comes late, and that client is there). The writer
is the only task that sends frames of ours on the transport: direct replies,
then the session's events in ``seq`` order, read through the connection's own
cursor. Bad input gets a typed ``error`` frame and the connection stays usable.
When either task ends the connection, the other is cancelled and the transport
is closed with a code (see docs/protocol.md).

A send that makes no progress for ``send_timeout`` seconds is never cancelled
and then reused (that would tear the frame): the connection is aborted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

import trio

from ._config import Config
from ._exceptions import ProtocolError, RunRefused, RuntimeClosed, TransportClosed
from ._messages import CancelRequest, ClientMessage, Ping, ResumeRequest, UserMessage
from ._protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_LAGGING,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_BIG,
    MAX_BATCH,
    MAX_BATCH_CHARS,
    PONG_FRAME,
    error_frame,
    events_frame,
    parse_client_frame,
    resume_gap_frame,
    run_accepted_frame,
    session_ready_frame,
)
from ._sequencer import Subscription, SubscriptionLagged
from ._trace import UnifiedTraceContext
from ._transport import (
    CLOSE_ABNORMAL,
    CoalescingTransport,
    DeliveryReportingTransport,
    Transport,
)

if TYPE_CHECKING:
    from ._session import Session

logger = logging.getLogger("netra_actors.connection")


class _Close(Exception):
    """Ends the connection with ``code`` (raised by the reader or the heartbeat)."""

    def __init__(self, code: int, *, abort: bool = False, reason: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.abort = abort
        self.reason = reason


#: Most frames written at once (a bound on the bytes one write holds in memory).
_WRITE_FRAMES = 128


def _batched(frames: Sequence[str], batch: int) -> Iterator[str]:
    """The frames that carry the events ``frames`` at most ``batch`` (and about
    ``MAX_BATCH_CHARS`` characters) at a time; a lone event goes as its own frame."""
    group: list[str] = []
    size = 0
    for frame in frames:
        if group and (len(group) >= batch or size + len(frame) > MAX_BATCH_CHARS):
            yield group[0] if len(group) == 1 else events_frame(group)
            group, size = [], 0
        group.append(frame)
        size += len(frame)
    if group:
        yield group[0] if len(group) == 1 else events_frame(group)


class Connection:
    """One client connection of a session (state owned by its tasks only)."""

    def __init__(
        self,
        session: Session,
        transport: Transport,
        *,
        connection_id: str,
        config: Config | None = None,
        traceparent: str | None = None,
        after_seq: int | None = None,
        session_hint: str | None = None,
        batch: int = 1,
        on_done: Callable[[Connection], None] | None = None,
    ) -> None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1 to {MAX_BATCH}, got {batch}")
        self.session = session
        # Checked once: isinstance on a runtime-checkable protocol is slow.
        self._coalesces = isinstance(transport, CoalescingTransport)
        self._delivered = (
            transport.delivered if isinstance(transport, DeliveryReportingTransport) else None
        )
        #: Most events per frame (1: one event per frame, the default protocol).
        self.batch = batch
        self.transport = transport
        self.connection_id = connection_id
        self.config = config or Config()
        self.traceparent = traceparent
        self.after_seq = after_seq
        self.session_hint = session_hint
        self.subscription: Subscription | None = None
        self.done = trio.Event()
        #: Called once the connection has ended, just before ``done`` is set.
        self._on_done = on_done
        self.close_code: int | None = None
        #: Why the server ended the connection ("" when the client did, or the session).
        self.close_reason = ""
        # Set by the reader: close with this code once the queued replies are sent.
        self._close_after_replies: int | None = None
        # Whether the writer is inside a send (so the frame stream may be mid-frame).
        self._sending = False

    def _resume(self, sub: Subscription, after_seq: int, session_id: str | None) -> int:
        """Point ``sub`` just after ``after_seq``, or send ``resume_gap`` if that is not exact.

        Not exact: another stream's ``session_id``, ``after_seq`` beyond the last
        event, or events after it that are no longer kept (in the window, or in the
        store when the session has one). The stream then
        continues from the oldest event kept; nothing is skipped silently.
        """
        session = self.session
        sequencer = session.sequencer
        oldest, last = sequencer.oldest_seq, sequencer.window.last_seq
        exact = (session_id is None or session_id == session.session_id) and (
            oldest - 1 <= after_seq <= last
        )
        if exact:
            sub.reposition(after_seq)
            return after_seq
        sub.push_direct(resume_gap_frame(session.session_id, oldest, last))
        sub.reposition(oldest - 1)
        return oldest - 1

    async def run(self) -> None:
        """Serve the connection until the client leaves or the session ends.

        On cancellation the transport is closed (1001) without waiting for the peer.
        """
        session = self.session
        # The cursor and last_seq are read in the same step, so the client receives
        # every event with seq > last_seq and nothing before it.
        sub = self.subscription = session.subscribe()
        last_seq = sub.cursor
        sub.push_direct(
            session_ready_frame(session.session_id, session.user_id, last_seq, batch=self.batch)
        )
        if self.after_seq is not None:
            restart = self._resume(sub, self.after_seq, self.session_hint)
            # Tell the client where this connection's stream restarts (session_ready
            # stays first: the frame is rebuilt before anything was sent).
            sub._direct[0] = session_ready_frame(
                session.session_id, session.user_id, last_seq, after_seq=restart, batch=self.batch
            )
        session.connection_opened()
        code, abort = CLOSE_GOING_AWAY, False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, nursery.cancel_scope)
                code, abort = await self._writer(sub)
                nursery.cancel_scope.cancel()
        except* _Close as group:
            close = group.exceptions[0]
            assert isinstance(close, _Close)
            code, abort, self.close_reason = close.code, close.abort, close.reason
        except* Exception:
            logger.exception("connection %s failed", self.connection_id)
            code = CLOSE_INTERNAL
        finally:
            session.connection_closed()
            sub.close()
            self.close_code = CLOSE_ABNORMAL if abort else code
            if self.close_reason:
                logger.info(
                    "connection %s of user %s %s (%d): %s",
                    self.connection_id,
                    session.user_id,
                    "aborted" if abort else "closed",
                    self.close_code,
                    self.close_reason,
                    extra={"user_id": session.user_id, "session_id": session.session_id},
                )
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = trio.current_time() + 2
                try:
                    if abort:
                        await self.transport.abort()
                    else:
                        await self.transport.close(code)
                except Exception:
                    logger.debug("close of %s failed", self.connection_id, exc_info=True)
                if shield.cancelled_caught:
                    await self.transport.abort()
            self._ended()

    def _ended(self) -> None:
        if self._on_done is not None:
            self._on_done(self)
        self.done.set()

    async def _write(self, frames: Sequence[str], limit: trio.CancelScope) -> None:
        """Send ``frames`` as consecutive frames: one write when the transport can,
        else frame by frame. ``limit`` (the writer's scope) gets a deadline of
        ``send_timeout`` per write: a write that makes no progress by then cancels
        the writer, which aborts the connection."""
        timeout = self.config.send_timeout
        self._sending = True
        try:
            if len(frames) > 1 and self._coalesces:
                limit.deadline = trio.current_time() + timeout
                await cast(CoalescingTransport, self.transport).send_texts(frames)
            else:
                for frame in frames:
                    limit.deadline = trio.current_time() + timeout
                    await self.transport.send_text(frame)
        finally:
            self._sending = False
            limit.deadline = math.inf

    async def _writer(self, sub: Subscription) -> tuple[int, bool]:
        """Send direct frames and events in order; ``(close code, abort)`` when done.

        Direct frames (replies) go first, in the same write as the events that
        were waiting with them. Write coalescing: while a stream keeps producing
        (the previous write was less than ten lingers ago), the writer waits
        ``write_linger`` seconds before taking the next batch, so what
        accumulates meanwhile goes out in one write (one system call) instead of
        one per event. A quiet stream's first event, and any reply, go out at once.

        A write that makes no progress for ``send_timeout`` seconds is never
        cancelled and then reused (that would tear a frame): the connection is
        aborted (1006).
        """
        linger = self.config.write_linger
        previous, busy = -math.inf, False
        limit = trio.CancelScope()
        try:
            with limit:
                while True:
                    if busy and trio.current_time() - previous < 10 * linger:
                        await sub.linger(linger)
                    batch = await sub.next_batch()
                    if batch is None:
                        return CLOSE_GOING_AWAY, False
                    previous = trio.current_time()
                    direct, events = batch
                    # A stream that is producing: events keep coming.
                    busy = linger > 0 and bool(events)
                    if self._close_after_replies is not None:
                        # Send every reply queued up to the closing error, then close.
                        await self._write(direct + sub.take_direct(), limit)
                        return self._close_after_replies, False
                    if self.batch == 1 or len(events) == 1:
                        frames = direct + events
                    else:
                        frames = direct + list(_batched(events, self.batch))
                    for start in range(0, len(frames), _WRITE_FRAMES):
                        await self._write(frames[start : start + _WRITE_FRAMES], limit)
                    if events:
                        self.session._services.telemetry.events_delivered(len(events))
            # Only a write past its deadline leaves the loop this way: the frame may
            # be half-written, so the connection cannot be used again.
            self.close_reason = f"a write made no progress for {self.config.send_timeout:g} s"
            return CLOSE_ABNORMAL, True
        except TransportClosed as exc:
            return exc.code or 1000, False
        except SubscriptionLagged:
            self.close_reason = "fell out of the replay window"
            return CLOSE_LAGGING, False
        except _Close as close:
            self.close_reason = close.reason
            return close.code, close.abort

    async def _reader(self, done: trio.CancelScope) -> None:
        assert self.subscription is not None
        reply = self.subscription.push_direct
        limit = self.config.max_frame_bytes
        interval = self.config.heartbeat_interval
        try:
            while True:
                with trio.move_on_after(interval) as quiet:
                    message = await self.transport.receive()
                if quiet.cancelled_caught:
                    # Nothing from the peer for a heartbeat interval: is it still there?
                    await self._heartbeat()
                    continue
                # trio-websocket's limit counts characters; the documented limit is bytes.
                if isinstance(message, bytes):
                    if len(message) > limit:
                        raise _Close(CLOSE_TOO_BIG, reason=f"a frame over {limit:,} bytes")
                elif (
                    len(message) * 4 > limit  # cheap test first: at most 4 bytes a character
                    and len(message.encode("utf-8", "surrogatepass")) > limit
                ):
                    raise _Close(CLOSE_TOO_BIG, reason=f"a frame over {limit:,} bytes")
                if not self.session.rate_limiter.allow():
                    # The writer sends the replies queued so far and this error, then
                    # closes with 4029; nothing more is read from this client.
                    self._close_after_replies = CLOSE_RATE_LIMITED
                    self.close_reason = "rate limited"
                    reply(error_frame("rate_limited", "too many frames; slow down"))
                    await trio.sleep_forever()
                try:
                    parsed = parse_client_frame(message)
                except ProtocolError as exc:
                    reply(error_frame(exc.code, str(exc), exc.client_msg_id))
                    continue
                client_msg_id = getattr(parsed, "client_msg_id", None)
                try:
                    await self._handle(parsed, client_msg_id, reply)
                except ProtocolError as exc:
                    reply(error_frame(exc.code, str(exc), exc.client_msg_id))
                except Exception as exc:
                    logger.exception("frame from %s failed", self.connection_id)
                    reply(
                        error_frame(
                            "internal", f"internal error: {type(exc).__name__}", client_msg_id
                        )
                    )
                if self.subscription.overflowed:
                    # The client sends but does not read its replies. Close now: with
                    # 4008 when nothing is being written, else abort (a close frame
                    # cannot get past a send the peer is not reading).
                    raise _Close(CLOSE_LAGGING, abort=self._sending, reason="replies not read")
        except TransportClosed as exc:
            if exc.code == CLOSE_ABNORMAL:
                # Dropped, not closed (no close frame): report it as such (1006), whether
                # the reader or the writer notices first.
                raise _Close(CLOSE_ABNORMAL, abort=True) from None
        # The client is gone: nothing more to write.
        done.cancel()

    async def _heartbeat(self) -> None:
        """Ping the peer; return once it answers. Raises ``_Close`` (abort) if neither a
        pong came within ``heartbeat_timeout`` nor did the peer take delivery of anything
        we sent meanwhile.

        A pong cannot overtake the frames queued ahead of its ping: a client reading a
        long backlog slowly answers late while plainly there. So while the transport
        reports that the peer keeps taking our data (``delivered``), the connection
        pings again and waits another ``timeout``; a peer that takes nothing for that
        long is aborted, whether the link died or the client stopped reading.
        """
        delivered, timeout = self._delivered, self.config.heartbeat_timeout
        while True:
            before = delivered() if delivered is not None else None
            with trio.move_on_after(timeout):
                await self.transport.ping()
                return
            after = delivered() if delivered is not None else None
            if before is None or after is None or after <= before:
                raise _Close(CLOSE_ABNORMAL, abort=True, reason=f"no pong within {timeout:g} s")

    async def _handle(
        self, parsed: ClientMessage, client_msg_id: str | None, reply: Callable[[str], None]
    ) -> None:
        try:
            match parsed:
                case UserMessage() as msg:
                    trace = UnifiedTraceContext.from_traceparent(
                        msg.traceparent or self.traceparent
                    )
                    admission = await self.session.start_run(
                        msg.text,
                        thread_id=msg.thread_id,
                        client_msg_id=msg.client_msg_id,
                        trace=trace,
                        policy=msg.policy,
                    )
                    if not admission.accepted:
                        raise RunRefused(admission.code or "unavailable", admission.message or "")
                    reply(run_accepted_frame(admission.run_id, admission.thread_id, client_msg_id))
                case CancelRequest(run_id=run_id):
                    outcome = await self.session.cancel_run(run_id, "client")
                    if outcome.state == "not_found":
                        raise ProtocolError(
                            "not_found",
                            f"no queued or active run {run_id!r}",
                            client_msg_id=client_msg_id,
                        )
                case ResumeRequest(after_seq=after_seq, session_id=session_id):
                    assert self.subscription is not None
                    self._resume(self.subscription, after_seq, session_id)
                case Ping():
                    reply(PONG_FRAME)
        except RunRefused as exc:
            raise ProtocolError(exc.code, str(exc), client_msg_id=client_msg_id) from None
        except RuntimeClosed as exc:
            # The session is ending: the writer flushes its last events and closes.
            raise ProtocolError("unavailable", str(exc), client_msg_id=client_msg_id) from None
