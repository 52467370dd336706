"""``UnifiedWebSocketManager``: the registry of sessions and connections, by user.

Owned by the runtime and only touched from its tasks (all in one trio
thread), so it needs no lock. ``send_to_user`` delivers an out-of-band frame
(no ``seq``) to every open connection of one user and of no other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._protocol import encode

if TYPE_CHECKING:
    from ._connection import Connection
    from ._session import Session


class UnifiedWebSocketManager:
    """Which sessions exist and which connections each user has open."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._connections: dict[str, list[Connection]] = {}

    def add_session(self, session: Session) -> None:
        self._sessions[session.user_id] = session

    def remove_session(self, session: Session) -> None:
        if self._sessions.get(session.user_id) is session:
            del self._sessions[session.user_id]

    def session_for(self, user_id: str) -> Session | None:
        return self._sessions.get(user_id)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def add_connection(self, user_id: str, connection: Connection) -> None:
        self._connections.setdefault(user_id, []).append(connection)

    def remove_connection(self, user_id: str, connection: Connection) -> None:
        conns = self._connections.get(user_id, [])
        if connection in conns:
            conns.remove(connection)
        if not conns:
            self._connections.pop(user_id, None)

    def connections(self, user_id: str) -> list[Connection]:
        """The open connections of ``user_id`` (several tabs)."""
        return list(self._connections.get(user_id, ()))

    def connection_count(self) -> int:
        return sum(len(c) for c in self._connections.values())

    def send_to_user(self, user_id: str, frame: Mapping[str, Any]) -> int:
        """Queue ``frame`` on every open connection of ``user_id``; returns how many.

        The frame must have a ``type`` and must not carry ``seq``: it is not part
        of the session's event stream and is not replayed.
        """
        if "type" not in frame or "seq" in frame:
            raise ValueError("an out-of-band frame needs a 'type' and no 'seq'")
        text = encode(frame)
        sent = 0
        for connection in self._connections.get(user_id, ()):
            if connection.subscription is not None and not connection.subscription.closed:
                connection.subscription.push_direct(text)
                sent += 1
        return sent
