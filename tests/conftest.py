"""Shared fixtures: hypothesis profiles, a live server on 127.0.0.1, token helpers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import attrs
import pytest
import trio
from hypothesis import HealthCheck, settings

from netra_actors import Config, Runtime, issue_token, serve

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: A test secret long enough for HS256 (PyJWT warns below 32 bytes).
TEST_SECRET = "netra-actors-test-secret-0123456789abcdef"


@attrs.frozen
class LiveServer:
    """A real server on 127.0.0.1 (free port) over a real runtime."""

    runtime: Runtime
    config: Config
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, user_id: str, ttl: float = 600.0, now: float | None = None) -> str:
        return issue_token(user_id, TEST_SECRET.encode(), ttl=ttl, now=now)

    def url_for(self, user_id: str) -> str:
        return f"{self.url}?token={self.token(user_id)}"


@pytest.fixture
def make_config(tmp_path: os.PathLike[str]) -> Callable[..., Config]:
    """Build a test ``Config`` (port 0, a temporary data folder, a fixed secret)."""

    def build(**overrides: object) -> Config:
        values: dict[str, object] = {
            "host": "127.0.0.1",
            "port": 0,
            "data_dir": tmp_path,
            "secret": TEST_SECRET,
            "shutdown_grace": 2.0,
            # Tests that exercise persistence ask for store="sqlite" (in tmp_path).
            "store": "memory",
            # Tests time deliveries to the virtual microsecond; the ones about write
            # coalescing set write_linger themselves.
            "write_linger": 0.0,
        }
        values.update(overrides)
        return Config(**values)  # type: ignore[arg-type]

    return build


@pytest.fixture
async def live_server(make_config: Callable[..., Config]) -> AsyncIterator[LiveServer]:
    """The demo runtime served over real WebSockets on 127.0.0.1 (real clock)."""
    config = make_config()
    async with Runtime(config) as runtime, trio.open_nursery() as nursery:
        server = await nursery.start(serve, runtime, config)
        yield LiveServer(runtime, config, server.port)
        nursery.cancel_scope.cancel()
