"""End-to-end benchmark of issue 7: netra beside its baselines, same run, same machine.

The server under test (``netra-actors serve``) and three baselines (a bare
trio-websocket server, an asyncio ``websockets`` peer, plain trio TCP) each run
in their own process; raw-socket WebSocket clients in other processes load
them. See ``benchmarks/e2e/__init__.py`` and docs/benchmarks.md.

Usage::

    python benchmarks/bench_e2e.py [--profile quick|full] [--only throughput,latency,...]

``make bench`` runs the quick profile (under 5 minutes on 2 cores), ``make
bench-full`` the full one.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The harness is the package benchmarks/e2e; the client and baseline processes import it
# as benchmarks.e2e from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e.harness import main

if __name__ == "__main__":
    sys.exit(main())
