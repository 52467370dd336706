"""Conversation histories per thread, kept apart from the event stream.

The model needs each thread's earlier turns, with the real (unredacted) tool
arguments and results; the event stream is what users see. A
``ConversationStore`` keeps the former. The in-memory default lives as long as
the runtime; a persistent store (SQLite, later) implements the same two methods.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

import trio

from ._llm import ChatMessage


class ConversationStore(Protocol):
    """Where threads' histories live. Both methods are checkpoints."""

    async def load(self, user_id: str, thread_id: str) -> list[ChatMessage]:
        """The thread's messages, oldest first (system prompts excluded)."""
        ...

    async def append(self, user_id: str, thread_id: str, messages: Sequence[ChatMessage]) -> None:
        """Add one finished turn's messages to the thread."""


class MemoryConversationStore:
    """Histories in memory, at most ``max_messages`` per thread (the oldest fall out).

    Trimming never starts a history with a ``tool`` message whose call is gone,
    which chat-completions APIs refuse.
    """

    def __init__(self, max_messages: int = 200) -> None:
        self.max_messages = max_messages
        self._threads: dict[tuple[str, str], deque[ChatMessage]] = {}

    async def load(self, user_id: str, thread_id: str) -> list[ChatMessage]:
        await trio.lowlevel.checkpoint()
        return list(self._threads.get((user_id, thread_id), ()))

    async def append(self, user_id: str, thread_id: str, messages: Sequence[ChatMessage]) -> None:
        await trio.lowlevel.checkpoint()
        history = self._threads.setdefault((user_id, thread_id), deque())
        history.extend(messages)
        while len(history) > self.max_messages or (history and history[0].role == "tool"):
            history.popleft()
