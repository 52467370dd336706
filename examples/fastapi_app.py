"""A FastAPI application hosting the netra_actors runtime (Trio guest mode on its loop).

Run it::

    NETRA_ACTORS_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))') \\
        python examples/fastapi_app.py --port 8000     # or: uvicorn examples.fastapi_app:app
    netra-actors token alice          # same NETRA_ACTORS_SECRET

then open ``ws://127.0.0.1:8000/ws?token=...`` with any protocol-v1 client, or
``POST /runs`` ``{"user_id": "alice", "text": "what is 2+3*4?"}`` to run in-process.

- ``/ws``: protocol v1 (``docs/protocol.md``), tokens as at the built-in gateway.
- ``POST /runs``: starts a run from an ordinary FastAPI handler and returns its
  events once it ended (``AsyncioRuntime.start_run`` + ``handle.collect()``).
- ``POST /runs/{user_id}/{run_id}/cancel``: cancels a run.
- ``GET /stats``: the runtime's statistics (a synchronous call: same thread).
- The ``weather`` tool is an asyncio coroutine (``asyncio_tool``): it runs on
  FastAPI's loop, where the application's own asyncio clients live.
"""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.routing import WebSocketRoute

from netra_actors import Config, ToolRegistry, tool_calling_agent
from netra_actors.aio import AsyncioRuntime, asyncio_tool
from netra_actors.asgi import token_authenticator, websocket_route


async def weather(city: str) -> dict[str, Any]:
    """Today's weather in a city (an asyncio coroutine: it runs on FastAPI's loop).

    Args:
        city: The city's name.
    """
    await asyncio.sleep(0.01)  # e.g. an aiohttp / asyncpg call
    return {"city": city, "forecast": "sunny"}


config = Config.from_env(store="memory")
if config.llm == "openai":
    # A real model (NETRA_ACTORS_LLM=openai): the general agent with an asyncio tool.
    runtime = AsyncioRuntime(
        config,
        agents={"assistant": tool_calling_agent(config.max_steps)},
        tools=ToolRegistry([asyncio_tool(weather)]),
    )
else:
    # Offline: the demo agent, its scripted model and its tools.
    runtime = AsyncioRuntime(config)

app = FastAPI(title="netra_actors on FastAPI", lifespan=runtime.lifespan)
# A plain Starlette route: FastAPI's parameter injection does not apply to it.
app.router.routes.append(
    WebSocketRoute("/ws", websocket_route(runtime, token_authenticator(config)))
)


class RunRequest(BaseModel):
    user_id: str
    text: str
    thread_id: str = "main"


@app.post("/runs")
async def run(request: RunRequest) -> dict[str, Any]:
    """Run to the end and return its events (for long runs, use /ws instead)."""
    handle = await runtime.start_run(request.user_id, request.text, thread_id=request.thread_id)
    events = await handle.collect()
    return {
        "run_id": handle.run_id,
        "events": [{"seq": e.seq, "type": e.type, "data": dict(e.data)} for e in events],
    }


@app.post("/runs/{user_id}/{run_id}/cancel")
async def cancel(user_id: str, run_id: str) -> dict[str, str]:
    outcome = await runtime.cancel_run(user_id, run_id)
    return {"run_id": run_id, "state": outcome.state}


@app.get("/stats")
async def stats() -> dict[str, int]:
    return attrs.asdict(runtime.statistics())


def main() -> None:
    """``python examples/fastapi_app.py [--host H] [--port P]``: serve with uvicorn."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="FastAPI app hosting netra_actors")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
