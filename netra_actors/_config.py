"""One configuration object for the runtime and the server.

Built from defaults, then ``NETRA_ACTORS_*`` environment variables, then CLI
flags (each later source wins). Every field has exactly one environment
variable (``NETRA_ACTORS_`` + the field name in upper case) and one CLI flag
(``--`` + the field name with dashes), both derived from the field, so the
three can never drift apart.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._exceptions import ConfigError

ENV_PREFIX = "NETRA_ACTORS_"


def _origins(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip().rstrip("/") for item in items if item.strip())


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    # Written so that NaN and infinity are refused too.
    if not 0 < value < math.inf:
        raise ConfigError(f"{attribute.name} must be a positive finite number, got {value}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value < math.inf:
        raise ConfigError(f"{attribute.name} must be a finite number >= 0, got {value}")


def _positive_or_none(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive(instance, attribute, value)


def parse_gc_thresholds(text: str) -> tuple[int, int, int]:
    """``"700,10,100"`` as the three thresholds of ``gc.set_threshold``.

    Raises:
        ConfigError: not three integers >= 0 (0 as the first disables collection).
    """
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise ConfigError(
            f"gc_thresholds must be three integers >= 0 like 700,10,100, got {text!r}"
        )
    return values


def _gc_thresholds(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        parse_gc_thresholds(value)


def _upper(value: object) -> str:
    return str(value).upper()


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{attribute.name} must be 0 to 65535, got {value}")


@attrs.frozen
class Config:
    """Settings of a runtime and its server. Immutable; use ``attrs.evolve`` to derive one."""

    host: str = attrs.field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = attrs.field(
        default=8765, validator=_port, metadata={"help": "TCP port (0 picks a free one)"}
    )
    data_dir: Path = attrs.field(
        default=Path(".netra_actors"),
        converter=Path,
        metadata={"help": "folder for the token secret and the SQLite store"},
    )
    secret: str | None = attrs.field(
        default=None,
        repr=False,
        metadata={"help": "token signing secret (default: the file 'secret' in data-dir)"},
    )
    agent: str = attrs.field(default="demo", metadata={"help": "agent that runs user messages"})
    max_steps: int = attrs.field(
        default=8, validator=_positive, metadata={"help": "tool-calling steps per run"}
    )
    tool_timeout: float = attrs.field(
        default=60.0, validator=_positive, metadata={"help": "default per-tool timeout, seconds"}
    )
    max_concurrent_tools: int = attrs.field(
        default=64, validator=_positive, metadata={"help": "tools running at once, server-wide"}
    )
    max_session_tools: int = attrs.field(
        default=16, validator=_positive, metadata={"help": "tools running at once per session"}
    )
    # -- the LLM ------------------------------------------------------------------------
    llm: str = attrs.field(
        default="scripted",
        validator=attrs.validators.in_(("scripted", "openai")),
        metadata={
            "help": "scripted (offline demo) or openai (any OpenAI-compatible endpoint; "
            "key from OPENAI_API_KEY)"
        },
    )
    base_url: str = attrs.field(
        default="https://api.openai.com/v1",
        metadata={"help": "API root of the OpenAI-compatible endpoint"},
    )
    model: str = attrs.field(default="gpt-4o-mini", metadata={"help": "model name to request"})
    llm_timeout: float = attrs.field(
        default=60.0, validator=_positive, metadata={"help": "LLM read timeout, seconds"}
    )
    llm_connect_timeout: float = attrs.field(
        default=10.0, validator=_positive, metadata={"help": "LLM connect timeout, seconds"}
    )
    llm_max_retries: int = attrs.field(
        default=3,
        validator=attrs.validators.ge(0),
        metadata={"help": "retries on 429/5xx/connection errors before any token"},
    )
    tool_cancel_grace: float = attrs.field(
        default=5.0,
        validator=_positive,
        metadata={"help": "a cancelled tool not stopped after this long is abandoned"},
    )
    window_events: int = attrs.field(
        default=10_000,
        validator=_positive,
        metadata={"help": "events each session keeps in its replay window"},
    )
    max_frame_bytes: int = attrs.field(
        default=1 << 20,
        validator=_positive,
        metadata={"help": "largest client frame accepted (bigger closes with 1009)"},
    )
    shutdown_grace: float = attrs.field(
        default=5.0,
        validator=_positive,
        metadata={"help": "seconds runs get to end after a shutdown starts"},
    )
    token_ttl: float = attrs.field(
        default=86_400.0, validator=_positive, metadata={"help": "default token lifetime, seconds"}
    )
    log_level: str = attrs.field(default="info", metadata={"help": "debug, info, warning, error"})
    # -- the gateway: handshakes, limits, liveness ---------------------------------------
    tls_cert: Path | None = attrs.field(
        default=None, metadata={"help": "PEM certificate: serve wss:// (with --tls-key)"}
    )
    tls_key: Path | None = attrs.field(default=None, metadata={"help": "PEM private key"})
    allowed_origins: tuple[str, ...] = attrs.field(
        default=(),
        converter=_origins,
        metadata={
            "help": "comma-separated Origin allow-list for browsers ('*' for any); "
            "requests without Origin and the server's own page are always allowed"
        },
    )
    max_connections: int = attrs.field(
        default=10_000, validator=_positive, metadata={"help": "server-wide connection cap (503)"}
    )
    max_connections_per_user: int = attrs.field(
        default=16, validator=_positive, metadata={"help": "connections per user (429)"}
    )
    handshake_timeout: float = attrs.field(
        default=10.0, validator=_positive, metadata={"help": "seconds to complete a handshake"}
    )
    receive_queue: int = attrs.field(
        default=16, validator=_positive, metadata={"help": "client frames buffered per connection"}
    )
    send_timeout: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata={"help": "a connection whose write has not completed after this long is aborted"},
    )
    heartbeat_interval: float = attrs.field(
        default=20.0,
        validator=_positive,
        metadata={"help": "seconds without a frame from the client before the server pings it"},
    )
    heartbeat_timeout: float = attrs.field(
        default=20.0,
        validator=_positive,
        metadata={
            "help": "a ping unanswered for this long, while the client took delivery of "
            "nothing, aborts the connection"
        },
    )
    rate_limit: float = attrs.field(
        default=20.0,
        validator=_positive,
        metadata={"help": "client frames per second per user (sustained); over it: close 4029"},
    )
    rate_burst: int = attrs.field(
        default=60, validator=_positive, metadata={"help": "client frames per user in a burst"}
    )
    # -- sessions and runs ---------------------------------------------------------------
    window_max_age: float = attrs.field(
        default=3600.0,
        validator=_positive,
        metadata={"help": "seconds an event stays in the replay window"},
    )
    idle_session_grace: float = attrs.field(
        default=300.0,
        validator=_positive,
        metadata={"help": "an idle session (no connection, no run) is closed after this long"},
    )
    thread_policy: str = attrs.field(
        default="enqueue",
        validator=attrs.validators.in_(("enqueue", "reject", "interrupt")),
        metadata={"help": "message for a busy thread: enqueue, reject or interrupt"},
    )
    max_queued_per_thread: int = attrs.field(
        default=16, validator=_positive, metadata={"help": "queued runs per thread"}
    )
    max_active_runs_per_user: int = attrs.field(
        default=4, validator=_positive, metadata={"help": "concurrently executing runs per user"}
    )
    write_linger: float = attrs.field(
        default=0.001,
        validator=_non_negative,
        metadata={
            "help": "seconds a busy stream's writer waits to send what accumulated in one "
            "write (0: never wait)"
        },
    )
    # -- runs ---------------------------------------------------------------------------
    run_timeout: float | None = attrs.field(
        default=600.0,
        validator=_positive_or_none,
        metadata={"help": "a run still going after this many seconds ends agent_error timeout"},
    )
    stall_timeout: float | None = attrs.field(
        default=300.0,
        validator=_positive_or_none,
        metadata={
            "help": "a run with no event and no tool result for this many seconds ends "
            "agent_error timeout"
        },
    )
    # -- persistence --------------------------------------------------------------------
    store: str = attrs.field(
        default="sqlite",
        validator=attrs.validators.in_(("sqlite", "memory")),
        metadata={
            "help": "sqlite (runs and events in data-dir/netra.sqlite3, kept across restarts) "
            "or memory (nothing persisted)"
        },
    )
    sqlite_synchronous: str = attrs.field(
        default="NORMAL",
        converter=_upper,
        validator=attrs.validators.in_(("NORMAL", "FULL")),
        metadata={
            "help": "NORMAL survives a process crash, FULL also a power loss (slower commits)"
        },
    )
    retention_max_age: float | None = attrs.field(
        default=30 * 86_400.0,
        validator=_positive_or_none,
        metadata={"help": "stored events older than this many seconds are pruned"},
    )
    retention_max_events: int | None = attrs.field(
        default=100_000,
        validator=_positive_or_none,
        metadata={"help": "events kept per session in the store (the oldest are pruned)"},
    )
    retention_interval: float = attrs.field(
        default=3600.0, validator=_positive, metadata={"help": "seconds between pruning passes"}
    )
    # -- observability ------------------------------------------------------------------
    metrics_token: str | None = attrs.field(
        default=None,
        repr=False,
        metadata={"help": "bearer token required by GET /metrics (default: open)"},
    )
    otel: bool = attrs.field(
        default=False,
        metadata={
            "help": "export spans with OpenTelemetry (needs opentelemetry-sdk; configured by "
            "the standard OTEL_* variables)"
        },
    )
    gc_thresholds: str | None = attrs.field(
        default="700,10,100",
        validator=_gc_thresholds,
        metadata={
            "help": "garbage-collector thresholds the server process sets at start "
            "(gc.set_threshold; none: Python's 700,10,10); an embedded Runtime leaves them "
            "alone. Full collections are ten times rarer than Python's: see "
            "docs/benchmarks.md"
        },
    )
    log_format: str = attrs.field(
        default="text",
        validator=attrs.validators.in_(("text", "json")),
        metadata={"help": "text, or json (one object per line, with trace ids)"},
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then ``NETRA_ACTORS_*`` variables from ``environ``, then ``overrides``.

        Raises:
            ConfigError: a variable does not parse as its field's type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _parse(field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, names: Sequence[str] | None = None
    ) -> None:
        """Add a ``--flag`` for each field (or for ``names`` only); defaults stay ``None``."""
        for field in attrs.fields(cls):
            if names is not None and field.name not in names:
                continue
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=field.name,
                default=None,
                type=functools.partial(_parse_flag, field),
                help=f"{field.metadata.get('help', '')} "
                f"(env {ENV_PREFIX}{field.name.upper()}, default {field.default!s})",
            )

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> Config:
        """Environment first, then the flags that were given."""
        overrides = {f.name: getattr(args, f.name, None) for f in attrs.fields(cls)}
        return cls.from_env(environ, **overrides)


def _parse_flag(field: attrs.Attribute[Any], raw: str) -> Any:
    """``_parse`` for argparse, which turns ``ArgumentTypeError`` into a usage error."""
    try:
        return _parse(field, raw)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True} | {
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _parse(field: attrs.Attribute[Any], raw: str) -> Any:
    kind = str(field.type)
    if kind.endswith(" | None"):
        if raw.strip().lower() in ("", "none"):
            return None
        kind = kind.removesuffix(" | None")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        if kind == "bool":
            word = raw.strip().lower()
            if word not in _BOOLEANS:
                raise ValueError(raw)
            return _BOOLEANS[word]
    except ValueError:
        raise ConfigError(f"{field.name}: {raw!r} is not a valid {kind}") from None
    return raw
