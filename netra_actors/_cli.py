"""The ``netra-actors`` command: ``serve`` the demo (or another agent), print a ``token``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from ._auth import issue_token, load_secret
from ._config import Config
from ._exceptions import NetraError
from ._telemetry import Telemetry, configure_logging, install_otel_from_env

SERVE_FLAGS = (
    "host",
    "port",
    "data_dir",
    "agent",
    "max_steps",
    "tool_timeout",
    "window_events",
    "max_frame_bytes",
    "shutdown_grace",
    "token_ttl",
    "log_level",
    "tls_cert",
    "tls_key",
    "allowed_origins",
    "max_connections",
    "max_connections_per_user",
    "handshake_timeout",
    "receive_queue",
    "send_timeout",
    "heartbeat_interval",
    "heartbeat_timeout",
    "rate_limit",
    "rate_burst",
    "window_max_age",
    "idle_session_grace",
    "thread_policy",
    "max_queued_per_thread",
    "max_active_runs_per_user",
    "max_concurrent_tools",
    "max_session_tools",
    "tool_cancel_grace",
    "llm",
    "base_url",
    "model",
    "llm_timeout",
    "llm_connect_timeout",
    "llm_max_retries",
    "run_timeout",
    "stall_timeout",
    "store",
    "sqlite_synchronous",
    "retention_max_age",
    "retention_max_events",
    "retention_interval",
    "metrics_token",
    "otel",
    "log_format",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netra-actors",
        description="Ordered, cancellable, real-time event streams for AI-agent runs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebSocket server (demo agent by default)")
    Config.add_arguments(serve, SERVE_FLAGS)
    token = commands.add_parser("token", help="print a token the server accepts for USER")
    token.add_argument("user", metavar="USER")
    token.add_argument("--ttl", type=float, default=None, help="lifetime in seconds")
    Config.add_arguments(token, ("data_dir",))
    return parser


def _banner(config: Config, url: str, token: str) -> str:
    return "\n".join(
        [
            f"netra-actors: serving protocol v1 at {url} (agent {config.agent!r}, "
            + (
                "scripted offline LLM)"
                if config.llm == "scripted"
                else f"LLM {config.model!r} at {config.base_url})"
            ),
            f"  a token for user 'demo' (valid {config.token_ttl:g} s):",
            f"    {token}",
            "  connect, for example:",
            f"    {url}?token={token}",
            "  then send:",
            '    {"type":"user_message","text":"what is 2+3*4?"}',
            "  other users: netra-actors token USER",
            "  stop with Ctrl-C",
        ]
    )


async def _serve(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully.

    On a signal: stop accepting connections, cancel active runs (reason
    ``shutdown``, each ending with its terminal event within
    ``shutdown_grace``), send connections every event, close them with 1001.
    """
    from ._gateway import Gateway, serve
    from ._runtime import Runtime

    telemetry = Telemetry.from_config(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Runtime(config, telemetry=telemetry) as runtime:
            gateway = Gateway(runtime, config)
            async with trio.open_nursery() as nursery:
                info = await nursery.start(partial(serve, runtime, config, gateway=gateway))
                token = issue_token("demo", load_secret(config), ttl=config.token_ttl)
                print(_banner(config, info.url, token), flush=True)
                async for signum in signals:
                    print(f"netra-actors: {signal.Signals(signum).name}, shutting down", flush=True)
                    break
                # New handshakes get 503 from here on; the listener keeps running so
                # that open connections receive their runs' last events and a 1001.
                gateway.accepting = False
                await runtime.aclose()
                nursery.cancel_scope.cancel()
    print("netra-actors: stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "token":
            config = Config.from_args(args)
            ttl = args.ttl if args.ttl is not None else config.token_ttl
            print(issue_token(args.user, load_secret(config), ttl=ttl))
            return 0
        config = Config.from_args(args)
        configure_logging(config.log_level, config.log_format)
        provider = install_otel_from_env() if config.otel else None
        try:
            trio.run(_serve, config)
        finally:
            if provider is not None:
                provider.shutdown()  # flushes the spans not exported yet
        return 0
    except (NetraError, ValueError) as exc:
        print(f"netra-actors: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
