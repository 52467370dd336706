"""What the asyncio bridge costs: the same run consumed natively in Trio and from asyncio.

Three ways to read the demo's ``stream N`` (N + 3 events), in one process, one after
another, repeated; for each: events per second of wall time, CPU per event, and the
delay from the event's ``ts`` (stamped by the sequencer) to its arrival at the consumer
(p50 / p99):

- ``trio``: plain ``trio.run``, a Trio consumer (``RunHandle.events()``), the baseline;
- ``guest+trio``: the runtime in Trio guest mode on an asyncio loop, the consumer on the
  Trio side (``AsyncioRuntime.call``);
- ``guest+asyncio``: guest mode, the consumer in asyncio (``AsyncioRunHandle.events()``):
  every event crosses the boundary.

    python benchmarks/bench_asyncio_bridge.py [--events 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import trio

from netra_actors import Config, Runtime
from netra_actors._runtime import RunHandle
from netra_actors.aio import AsyncioRuntime
from netra_actors.testing import check_lifecycle

CONFIG = Config(store="memory", window_events=100_000)


def _record(delays: list[float], ts: float) -> None:
    delays.append(time.time() - ts)


async def _consume_trio(handle: RunHandle, delays: list[float]) -> list[str]:
    frames = []
    async for event in handle.events():
        _record(delays, event.ts)
        frames.append(event.frame)
    return frames


def plain_trio(events: int, delays: list[float]) -> list[str]:
    async def main() -> list[str]:
        async with Runtime(CONFIG) as runtime:
            return await _consume_trio(await runtime.start_run("u", f"stream {events}"), delays)

    return trio.run(main)


def guest_trio(events: int, delays: list[float]) -> list[str]:
    async def main() -> list[str]:
        async with AsyncioRuntime(CONFIG) as rt:

            async def inside() -> list[str]:
                handle = await rt.runtime.start_run("u", f"stream {events}")
                return await _consume_trio(handle, delays)

            return await rt.call(inside)

    return asyncio.run(main())


def guest_asyncio(events: int, delays: list[float]) -> list[str]:
    async def main() -> list[str]:
        async with AsyncioRuntime(CONFIG) as rt:
            handle = await rt.start_run("u", f"stream {events}")
            frames = []
            async for event in handle.events():
                _record(delays, event.ts)
                frames.append(event.frame)
            return frames

    return asyncio.run(main())


WAYS: dict[str, Callable[[int, list[float]], list[str]]] = {
    "trio": plain_trio,
    "guest+trio": guest_trio,
    "guest+asyncio": guest_asyncio,
}


def measure(events: int, repeat: int) -> dict[str, dict[str, float]]:
    """Median over ``repeat`` runs of each way; every stream checked with check_lifecycle."""
    samples: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in WAYS}
    for _ in range(repeat):
        for name, way in WAYS.items():
            delays: list[float] = []
            cpu, wall = time.process_time(), time.perf_counter()
            frames = way(events, delays)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            check_lifecycle(frames)
            assert len(frames) == events + 3, (name, len(frames))
            delays.sort()
            samples[name].append(
                (
                    len(frames) / wall,
                    cpu / len(frames) * 1e6,
                    delays[len(delays) // 2] * 1e3,
                    delays[int(len(delays) * 0.99)] * 1e3,
                )
            )
    return {
        name: {
            key: statistics.median(s[i] for s in rows)
            for i, key in enumerate(("events_per_s", "cpu_us_per_event", "p50_ms", "p99_ms"))
        }
        for name, rows in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = measure(args.events, args.repeat)
    base = results["trio"]
    print(f"stream {args.events}, median of {args.repeat}")
    print("| consumer | events/s | CPU us/event | x trio | ts->consumer p50 | p99 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['events_per_s']:,.0f} | {r['cpu_us_per_event']:.1f} | "
            f"{r['cpu_us_per_event'] / base['cpu_us_per_event']:.2f}x | "
            f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms |"
        )


if __name__ == "__main__":
    main()
