"""End-to-end benchmark harness (issue 7): the real path, beside baselines from the same run.

The server under test and every baseline run in their own processes; the load
comes from client worker processes that speak WebSocket over raw sockets and
only parse frame headers while measuring (every frame is decoded, and every
stream checked with the public lifecycle checker, afterwards, from what was
recorded). docs/benchmarks.md describes the method and the results.

Modules:

- ``wire``: sans-IO pieces shared by clients and baselines (the opening
  handshake, a header-only frame parser, masked client frames, the demo
  agent's events as the baselines emit them);
- ``client``: the client worker processes (one epoll loop and many connections each);
- ``baselines``: a bare trio-websocket server, an asyncio ``websockets`` peer,
  plain trio TCP (``python -m benchmarks.e2e.baselines KIND``);
- ``servers``: starting and measuring server processes (/proc);
- ``scenarios``: the scenarios and the quick / full profiles;
- ``report``: JSON, the Markdown tables and the charts.

Run it with ``python benchmarks/bench_e2e.py`` (``make bench`` / ``make bench-full``).
"""
