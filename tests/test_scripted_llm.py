"""The scripted model's streaming contract: every chunk is a cancellation point, and a
long turn lets other tasks run every ``YIELD_EVERY`` chunks (not at every chunk).

A task that counts its own passes through trio's scheduler shows how often the
streaming task yields; nothing here depends on time.
"""

from __future__ import annotations

import trio

from netra_actors import ChatMessage, ChatRequest, ScriptedLLMProvider, ScriptedTurn, TextDelta

PIECES = 200


def _long_answer(request: ChatRequest) -> ScriptedTurn:
    return ScriptedTurn(reasoning=("thinking",), answer=tuple(f"t{i} " for i in range(PIECES)))


def _request() -> ChatRequest:
    return ChatRequest((ChatMessage("user", "stream please"),))


async def test_a_cancelled_consumer_gets_no_chunk_after_the_cancel() -> None:
    """Cancelled after k chunks (the consumer awaiting nothing else), it gets no k+1-th."""
    provider = ScriptedLLMProvider(_long_answer)
    for k in (1, 2, 7, 8, 9, 50):
        got = []
        with trio.CancelScope() as scope:
            async for chunk in provider.stream_chat(_request()):
                got.append(chunk)
                if len(got) == k:
                    scope.cancel()
        assert scope.cancelled_caught
        assert len(got) == k


async def test_a_long_turn_lets_other_tasks_run_every_few_chunks() -> None:
    """Another task runs at least once per ``YIELD_EVERY`` chunks, and not once per chunk."""
    provider = ScriptedLLMProvider(_long_answer)
    passes = 0

    async def other() -> None:
        nonlocal passes
        while True:
            passes += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # ``other`` has started
        before = passes
        chunks = [chunk async for chunk in provider.stream_chat(_request())]
        ran = passes - before
        nursery.cancel_scope.cancel()
    answer = [chunk.text for chunk in chunks if isinstance(chunk, TextDelta)]
    assert answer == [f"t{i} " for i in range(PIECES)]
    every = ScriptedLLMProvider.YIELD_EVERY
    # (give or take a pass: trio runs the tasks of one scheduler batch in random order)
    assert len(chunks) // every - 2 <= ran <= len(chunks) // every + 2
