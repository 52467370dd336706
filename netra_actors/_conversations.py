"""Conversation histories per thread, kept apart from the event stream.

The model needs each thread's earlier turns, with the real (unredacted) tool
arguments and results; the event stream is what users see. A
``ConversationStore`` keeps the former. The in-memory default lives as long as
the runtime; a persistent store (SQLite, later) implements the same two methods.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import trio

from ._llm import ChatMessage
from ._messages import ToolCall


def trim_history(messages: Sequence[ChatMessage], max_messages: int) -> list[ChatMessage]:
    """The newest ``max_messages`` of ``messages``, never starting with a ``tool`` message
    whose call is gone (chat-completions APIs refuse such a history). Always a new list."""
    if not isinstance(messages, list):
        messages = list(messages)
    start = max(0, len(messages) - max_messages)
    while start < len(messages) and messages[start].role == "tool":
        start += 1
    return messages[start:]


def message_to_dict(message: ChatMessage) -> dict[str, Any]:
    """A history message as JSON-ready data (for stores that keep text)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"call_id": c.call_id, "name": c.name, "arguments": dict(c.arguments)}
            | ({"invalid_arguments": c.invalid_arguments} if c.invalid_arguments else {})
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def message_from_dict(data: Mapping[str, Any]) -> ChatMessage:
    """The inverse of ``message_to_dict``."""
    return ChatMessage(
        role=data["role"],
        content=data.get("content", ""),
        tool_calls=tuple(
            ToolCall(c["call_id"], c["name"], c.get("arguments", {}), c.get("invalid_arguments"))
            for c in data.get("tool_calls", ())
        ),
        tool_call_id=data.get("tool_call_id"),
        name=data.get("name"),
    )


class ConversationStore(Protocol):
    """Where threads' histories live. Both methods are checkpoints."""

    async def load(self, user_id: str, thread_id: str) -> list[ChatMessage]:
        """The thread's messages, oldest first (system prompts excluded), in a new list."""
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
        kept = trim_history(history, self.max_messages)
        while len(history) > len(kept):
            history.popleft()
