"""Cost of the runtime's event path in-process, as a ratio against a bare-channel baseline.

Both sides run in the same process and the same run:

- runtime: a demo run ``stream N`` (N ``partial_result`` events) through the
  agent actor, the bridge, the sequencer channel, the window and one
  subscription (``RunHandle.events()``), every stream checked with the public
  lifecycle checker;
- baseline: the same N events as dicts through one trio memory channel, encoded
  with orjson once each (the least any event path must do).

Usage: ``python benchmarks/bench_inprocess.py [--events N] [--repeat R]``.
A fuller harness (WebSocket clients in other processes, asyncio peer) is issue 7.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import orjson
import trio

from netra_actors import Config, Runtime
from netra_actors.testing import check_lifecycle


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def runtime_path(events: int) -> tuple[int, float]:
    async with Runtime(Config(store="memory")) as runtime:
        start = _cpu()
        run = await runtime.start_run("bench", f"stream {events}")
        received = await run.collect()
        spent = _cpu() - start
    check_lifecycle([orjson.loads(e.frame) for e in received])
    return len(received), spent


async def baseline_path(events: int) -> tuple[int, float]:
    send, recv = trio.open_memory_channel[dict[str, object]](256)
    count = 0

    async def produce() -> None:
        async with send:
            for i in range(events):
                await send.send(
                    {"type": "partial_result", "seq": i + 1, "data": {"text": f"t{i} "}}
                )

    start = _cpu()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with recv:
            async for item in recv:
                orjson.dumps(item)
                count += 1
    return count, _cpu() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeat):
        n_rt, cpu_rt = trio.run(runtime_path, args.events)
        n_bl, cpu_bl = trio.run(baseline_path, args.events)
        rows.append((cpu_rt / n_rt * 1e6, cpu_bl / n_bl * 1e6))
    rt_us = statistics.median(r[0] for r in rows)
    bl_us = statistics.median(r[1] for r in rows)
    print(f"events per run: {args.events}, repeats: {args.repeat}, {time.strftime('%Y-%m-%d')}")
    print(f"runtime path : {rt_us:7.2f} us CPU per event ({1e6 / rt_us:10.0f} events/s)")
    print(f"bare channel : {bl_us:7.2f} us CPU per event ({1e6 / bl_us:10.0f} events/s)")
    print(f"ratio        : {rt_us / bl_us:7.2f}x the bare-channel baseline")


if __name__ == "__main__":
    main()
