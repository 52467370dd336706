"""Server CPU per delivered event over real WebSockets: a quick A/B of server settings.

``netra-actors serve`` runs in a subprocess; K trio-websocket clients in this process each
send ``stream N`` and read until ``agent_completed``. The figure is the server process's
own CPU time (user + system, from ``/proc``) over the run divided by the events the
clients received, so it does not depend on whether the clients keep up.

    python benchmarks/bench_ws_cost.py --clients 10 --events 5000 --store memory \\
        --batch 1 --server-arg=--write-linger=0

(The full harness with baselines is ``benchmarks/e2e``; this is the quick A/B used
while changing the hot path.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import trio
import trio_websocket

from netra_actors import Config, issue_token
from netra_actors._auth import load_secret

SECRET = "bench-ws-cost-secret-0123456789abcdef0123"


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_client(url: str, token: str, events: int, batch: int, counts: list[int]) -> None:
    query = f"?token={token}" + (f"&batch={batch}" if batch > 1 else "")
    async with trio_websocket.open_websocket_url(
        url + query, message_queue_size=1024, max_message_size=1 << 24
    ) as ws:
        await ws.get_message()  # session_ready
        await ws.send_message(json.dumps({"type": "user_message", "text": f"stream {events}"}))
        got, done = 0, False
        while not done:
            message = await ws.get_message()
            frames = (
                json.loads(message)["events"]
                if message.startswith('{"type":"events"')
                else [json.loads(message)]
            )
            for frame in frames:
                if "seq" in frame:
                    got += 1
                    done = done or frame["type"] == "agent_completed"
        counts.append(got)


async def measure(clients: int, events: int, batch: int, store: str, extra: list[str]) -> str:
    env = dict(os.environ, NETRA_ACTORS_SECRET=SECRET)
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen(  # noqa: ASYNC220 (started once, before the clients)
            [
                sys.executable, "-m", "netra_actors", "serve", "--port", "0",
                "--store", store, "--data-dir", data_dir, "--log-level", "warning",
                "--rate-limit", "10000", "--rate-burst", "10000",
                "--window-events", "100000", *extra,
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            url = None
            for line in server.stdout:
                found = re.search(r"(ws://127\.0\.0\.1:\d+/ws)", line)
                if found:
                    url = found.group(1)
                    break
            assert url is not None, "the server did not start"
            key = load_secret(Config(secret=SECRET))
            tokens = [issue_token(f"user{i}", key) for i in range(clients)]
            counts: list[int] = []
            cpu0, wall0 = process_cpu(server.pid), time.monotonic()
            async with trio.open_nursery() as nursery:
                for token in tokens:
                    nursery.start_soon(one_client, url, token, events, batch, counts)
            cpu1, wall1 = process_cpu(server.pid), time.monotonic()
        finally:
            server.terminate()
            server.wait()
    total = sum(counts)
    return (
        f"clients={clients} events={events} batch={batch} store={store} {' '.join(extra)}: "
        f"{total} events, server {(cpu1 - cpu0) / total * 1e6:.1f} us CPU/event, "
        f"{total / (wall1 - wall0):.0f} events/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    args = parser.parse_args()
    print(trio.run(measure, args.clients, args.events, args.batch, args.store, args.server_arg))


if __name__ == "__main__":
    main()
