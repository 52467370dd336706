"""Configuration (netra_actors._config) and tokens (netra_actors._auth): no network, no server."""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import time
from pathlib import Path

import attrs
import jwt
import pytest

from netra_actors._auth import SECRET_FILE, issue_token, load_secret, verify_token
from netra_actors._config import ENV_PREFIX, Config
from netra_actors._exceptions import AuthError, ConfigError, NetraError

#: Long enough for HS256 without PyJWT's short-key warning (warnings are errors here).
SECRET = b"config-and-auth-test-secret-0123456789abcdef"
OTHER_SECRET = b"another-test-secret-for-auth-0123456789abcdef"

POSITIVE_FIELDS = (
    "max_steps",
    "tool_timeout",
    "window_events",
    "max_frame_bytes",
    "shutdown_grace",
    "token_ttl",
)


@pytest.fixture(autouse=True)
def _no_netra_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``NETRA_ACTORS_*`` variables of the outer environment out of these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


# --- Config: defaults and environment ----------------------------------------------------------


def test_defaults() -> None:
    """A default ``Config`` has the documented defaults."""
    config = Config()
    assert config.host == "127.0.0.1"
    assert config.port == 8765
    assert config.data_dir == Path(".netra_actors")
    assert config.secret is None
    assert config.agent == "demo"
    assert config.max_steps == 8
    assert config.tool_timeout == 60.0
    assert config.window_events == 10_000
    assert config.max_frame_bytes == 1 << 20
    assert config.shutdown_grace == 5.0
    assert config.token_ttl == 86_400.0
    assert config.log_level == "info"


def test_from_env_of_empty_environment_is_the_default() -> None:
    """With no ``NETRA_ACTORS_*`` variables, ``from_env`` gives the defaults."""
    assert Config.from_env({}) == Config()
    assert (
        Config.from_env({"PORT": "1", "NETRA_ACTORS_UNKNOWN": "x", "netra_actors_port": "2"})
        == Config()
    )


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("host", "0.0.0.0", "0.0.0.0"),
        ("port", "9000", 9000),
        ("port", "0", 0),
        ("data_dir", "/tmp/netra-data", Path("/tmp/netra-data")),
        ("secret", "s3cret", "s3cret"),
        ("agent", "echo", "echo"),
        ("max_steps", "3", 3),
        ("tool_timeout", "2.5", 2.5),
        ("tool_timeout", "7", 7.0),
        ("window_events", "50", 50),
        ("max_frame_bytes", "4096", 4096),
        ("shutdown_grace", "0.25", 0.25),
        ("token_ttl", "60", 60.0),
        ("log_level", "debug", "debug"),
        ("otel", "yes", True),
        ("otel", "0", False),
        ("run_timeout", "none", None),
        ("run_timeout", "30", 30.0),
        ("retention_max_events", "", None),
        ("sqlite_synchronous", "full", "FULL"),
    ],
)
def test_environment_variables_parse_with_types(name: str, raw: str, expected: object) -> None:
    """``NETRA_ACTORS_<FIELD>`` sets each field, parsed as the field's type."""
    config = Config.from_env({ENV_PREFIX + name.upper(): raw})
    value = getattr(config, name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("name", "raw"), [("otel", "maybe"), ("run_timeout", "-1"), ("sqlite_synchronous", "off")]
)
def test_bad_values_of_the_new_fields_are_refused(name: str, raw: str) -> None:
    """A bool that is not a yes/no word, a non-positive limit, an unknown sync mode."""
    with pytest.raises(ConfigError):
        Config.from_env({ENV_PREFIX + name.upper(): raw})


def test_every_field_has_an_environment_variable() -> None:
    """Each field of ``Config`` is read from its own ``NETRA_ACTORS_`` variable."""
    samples = {
        "int": "7",
        "float": "7.5",
        "Path": "some/dir",
        "str": "v",
        "str | None": "v",
        "Path | None": "cert.pem",
        "tuple[str, ...]": "https://a.example",
        "float | None": "7.5",
        "int | None": "7",
        "bool": "true",
    }
    by_name = {
        "thread_policy": "reject",
        "llm": "openai",
        "store": "memory",
        "sqlite_synchronous": "full",
        "log_format": "json",
        "gc_thresholds": "1000,20,50",
    }
    for field in attrs.fields(Config):
        raw = by_name.get(field.name, samples[str(field.type)])
        config = Config.from_env({ENV_PREFIX + field.name.upper(): raw})
        assert getattr(config, field.name) != getattr(Config(), field.name), field.name


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, ``from_env`` reads the process environment."""
    monkeypatch.setenv("NETRA_ACTORS_PORT", "9100")
    monkeypatch.setenv("NETRA_ACTORS_AGENT", "other")
    config = Config.from_env()
    assert (config.port, config.agent) == (9100, "other")


def test_explicit_environ_ignores_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit ``environ`` mapping replaces the process environment entirely."""
    monkeypatch.setenv("NETRA_ACTORS_PORT", "9100")
    assert Config.from_env({}).port == 8765


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("port", "abc"),
        ("port", "80.5"),
        ("port", ""),
        ("max_steps", "many"),
        ("window_events", "1e3"),
        ("max_frame_bytes", "1 MiB"),
        ("tool_timeout", "fast"),
        ("shutdown_grace", ""),
        ("token_ttl", "1 day"),
    ],
)
def test_unparsable_environment_values_raise_config_error(name: str, raw: str) -> None:
    """A variable that does not parse as its field's type raises ``ConfigError`` naming the field."""
    with pytest.raises(ConfigError, match=name):
        Config.from_env({ENV_PREFIX + name.upper(): raw})


@pytest.mark.parametrize("name", POSITIVE_FIELDS)
@pytest.mark.parametrize("raw", ["0", "-1"])
def test_non_positive_values_are_refused(name: str, raw: str) -> None:
    """Counts, sizes and durations must be positive, from the environment or the constructor."""
    with pytest.raises(ConfigError, match=name):
        Config.from_env({ENV_PREFIX + name.upper(): raw})
    with pytest.raises(ConfigError, match=name):
        Config(**{name: int(raw)})


@pytest.mark.parametrize("name", ["tool_timeout", "shutdown_grace", "token_ttl"])
def test_nan_durations_are_refused(name: str) -> None:
    """A NaN duration is not a positive number and is refused."""
    with pytest.raises(ConfigError):
        Config.from_env({ENV_PREFIX + name.upper(): "nan"})


def test_config_error_is_a_netra_error() -> None:
    """``ConfigError`` belongs to the package's exception hierarchy."""
    assert issubclass(ConfigError, NetraError)


def test_overrides_win_over_environment_and_none_is_ignored() -> None:
    """Keyword overrides beat the environment; an override of ``None`` leaves the value alone."""
    env = {"NETRA_ACTORS_PORT": "9000", "NETRA_ACTORS_HOST": "0.0.0.0"}
    config = Config.from_env(env, port=9001, host=None)
    assert (config.port, config.host) == (9001, "0.0.0.0")


def test_config_is_immutable_and_hides_the_secret() -> None:
    """``Config`` is frozen, and its repr does not show the secret."""
    config = Config(secret="do-not-print-me")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    assert "do-not-print-me" not in repr(config)
    assert attrs.evolve(config, port=1).port == 1


def test_data_dir_is_converted_to_a_path() -> None:
    """``data_dir`` given as a string becomes a ``Path``."""
    assert Config(data_dir="somewhere").data_dir == Path("somewhere")  # type: ignore[arg-type]


# --- Config: command-line flags ------------------------------------------------------------------


def _parser(names: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    Config.add_arguments(parser, names)
    return parser


def test_flags_default_to_none_so_environment_and_defaults_apply() -> None:
    """Flags that are not given leave the environment's values and the defaults in place."""
    args = _parser().parse_args([])
    assert all(getattr(args, f.name) is None for f in attrs.fields(Config))
    assert Config.from_args(args, environ={}) == Config()
    assert Config.from_args(args, environ={"NETRA_ACTORS_PORT": "9000"}).port == 9000


def test_flags_override_environment() -> None:
    """A flag that is given wins over the environment variable of the same field."""
    args = _parser().parse_args(["--port", "9001", "--tool-timeout", "3", "--data-dir", "d"])
    env = {
        "NETRA_ACTORS_PORT": "9000",
        "NETRA_ACTORS_HOST": "0.0.0.0",
        "NETRA_ACTORS_TOOL_TIMEOUT": "1",
    }
    config = Config.from_args(args, environ=env)
    assert config.port == 9001
    assert config.tool_timeout == 3.0
    assert config.data_dir == Path("d")
    assert config.host == "0.0.0.0"


def test_every_field_has_a_flag() -> None:
    """Each field has a ``--field-name`` flag whose value is parsed as the field's type."""
    argv = """--host h --port 1 --data-dir d --secret s --agent a --max-steps 2 --tool-timeout 3.5
        --window-events 4 --max-frame-bytes 5 --shutdown-grace 6 --token-ttl 7 --log-level debug"""
    args = _parser().parse_args(argv.split())
    assert Config.from_args(args, environ={}) == Config(
        host="h",
        port=1,
        data_dir=Path("d"),
        secret="s",
        agent="a",
        max_steps=2,
        tool_timeout=3.5,
        window_events=4,
        max_frame_bytes=5,
        shutdown_grace=6.0,
        token_ttl=7.0,
        log_level="debug",
    )


def test_add_arguments_can_restrict_to_some_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """With ``names``, only those fields get flags; others are refused by the parser."""
    parser = _parser(("port",))
    assert parser.parse_args(["--port", "5"]).port == 5
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--host", "h"])
    assert info.value.code == 2
    assert "--host" in capsys.readouterr().err


def test_flag_help_names_the_environment_variable_and_default() -> None:
    """Each flag's help mentions its environment variable and default."""
    text = _parser().format_help()
    assert "NETRA_ACTORS_PORT" in text
    assert "8765" in text


@pytest.mark.parametrize("name", POSITIVE_FIELDS)
def test_non_positive_flags_are_refused(name: str) -> None:
    """A non-positive value given as a flag raises ``ConfigError`` when the config is built."""
    args = _parser().parse_args([f"--{name.replace('_', '-')}", "0"])
    with pytest.raises(ConfigError, match=name):
        Config.from_args(args, environ={})


# --- secrets -------------------------------------------------------------------------------------


def test_load_secret_creates_a_private_file_once(tmp_path: Path) -> None:
    """The first call creates ``<data_dir>/secret`` with mode 0600; later calls return the same secret."""
    config = Config(data_dir=tmp_path / "nested" / "data")
    first = load_secret(config)
    path = tmp_path / "nested" / "data" / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().strip() == first
    assert len(first) >= 32
    mtime = path.stat().st_mtime_ns
    assert load_secret(config) == first
    assert load_secret(Config(data_dir=tmp_path / "nested" / "data")) == first
    assert path.stat().st_mtime_ns == mtime


def test_different_data_dirs_get_different_secrets(tmp_path: Path) -> None:
    """Secrets are random: two data folders do not share one."""
    assert load_secret(Config(data_dir=tmp_path / "a")) != load_secret(
        Config(data_dir=tmp_path / "b")
    )


def test_configured_secret_wins_over_the_file(tmp_path: Path) -> None:
    """``Config.secret`` (``NETRA_ACTORS_SECRET``) is used as is, and no file is created."""
    config = Config.from_env(
        {"NETRA_ACTORS_SECRET": SECRET.decode(), "NETRA_ACTORS_DATA_DIR": str(tmp_path)}
    )
    assert load_secret(config) == SECRET
    assert not (tmp_path / SECRET_FILE).exists()


def test_configured_secret_wins_over_an_existing_file(tmp_path: Path) -> None:
    """An existing secret file is ignored when ``Config.secret`` is set."""
    file_secret = load_secret(Config(data_dir=tmp_path))
    assert load_secret(Config(data_dir=tmp_path, secret=SECRET.decode())) == SECRET != file_secret


def test_existing_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    """A secret file written by hand is used, without its trailing newline."""
    (tmp_path / SECRET_FILE).write_bytes(SECRET + b"\n")
    assert load_secret(Config(data_dir=tmp_path)) == SECRET


def test_empty_secret_file_is_refused(tmp_path: Path) -> None:
    """An empty secret file raises ``AuthError`` instead of signing with an empty key."""
    (tmp_path / SECRET_FILE).write_bytes(b"  \n")
    with pytest.raises(AuthError) as info:
        load_secret(Config(data_dir=tmp_path))
    assert info.value.reason == "no_secret"


# --- tokens --------------------------------------------------------------------------------------


def _reason(token: str | None, secret: bytes = SECRET) -> str:
    with pytest.raises(AuthError) as info:
        verify_token(token, secret)
    return info.value.reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_issue_verify_round_trip() -> None:
    """A token issued for a user verifies to that user."""
    assert verify_token(issue_token("alice", SECRET), SECRET) == "alice"
    assert verify_token(issue_token("user with spaces \u00e9", SECRET, ttl=5), SECRET) == (
        "user with spaces \u00e9"
    )


def test_token_claims() -> None:
    """A token names the user in ``sub`` and expires ``ttl`` seconds after ``iat``."""
    token = issue_token("alice", SECRET, ttl=120, now=1_000_000)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "alice", "iat": 1_000_000, "exp": 1_000_120}


def test_token_with_file_secret_round_trips(tmp_path: Path) -> None:
    """Tokens signed with the data folder's secret verify with the same folder's secret."""
    token = issue_token("bob", load_secret(Config(data_dir=tmp_path)))
    assert verify_token(token, load_secret(Config(data_dir=tmp_path))) == "bob"


def test_empty_user_is_refused() -> None:
    """``issue_token`` refuses to name no user."""
    with pytest.raises(ValueError, match="user_id"):
        issue_token("", SECRET)


def test_expired_token() -> None:
    """A token past its expiry is refused with reason ``expired``."""
    token = issue_token("alice", SECRET, ttl=10, now=time.time() - 100)
    assert _reason(token) == "expired"


def test_token_from_the_future_within_ttl_is_accepted() -> None:
    """Expiry is what counts: a token that expires later verifies."""
    assert (
        verify_token(issue_token("alice", SECRET, ttl=3600, now=time.time() - 60), SECRET)
        == "alice"
    )


def test_tampered_payload_is_invalid() -> None:
    """Changing the claims of a signed token (here, the user) invalidates it."""
    header, _, signature = issue_token("alice", SECRET).split(".")
    claims = {"sub": "mallory", "iat": int(time.time()), "exp": int(time.time()) + 600}
    forged = ".".join([header, _b64(json.dumps(claims).encode()), signature])
    assert _reason(forged) == "invalid"


def test_tampered_signature_is_invalid() -> None:
    """Changing a character in the middle of the signature invalidates the token."""
    header, payload, signature = issue_token("alice", SECRET).split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    forged = ".".join([header, payload, signature[:middle] + flipped + signature[middle + 1 :]])
    assert _reason(forged) == "invalid"


def test_token_signed_with_another_secret_is_invalid() -> None:
    """A token signed with a different secret is invalid."""
    assert _reason(issue_token("alice", OTHER_SECRET)) == "invalid"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "..",
        "a.b",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "Bearer x.y.z",
        " ",
        "\u00e9.\u00e9.\u00e9",
    ],
)
def test_garbage_is_invalid(token: str) -> None:
    """Strings that are not tokens are refused with reason ``invalid``."""
    assert _reason(token) == "invalid"


@pytest.mark.parametrize("token", ["", None])
def test_missing_token(token: str | None) -> None:
    """No token at all (``None`` or empty) is refused with reason ``missing``."""
    assert _reason(token) == "missing"


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 4_000_000_000},
        {"exp": 4_000_000_000, "sub": ""},
        {"exp": 4_000_000_000, "sub": 42},
        {"exp": 4_000_000_000, "sub": None},
        {"sub": "alice"},
    ],
)
def test_token_without_user_or_expiry_is_invalid(claims: dict[str, object]) -> None:
    """A correctly signed token without a non-empty string ``sub``, or without ``exp``, is invalid."""
    assert _reason(jwt.encode(claims, SECRET, algorithm="HS256")) == "invalid"


def test_unsigned_token_is_invalid() -> None:
    """A token with algorithm ``none`` is refused, whatever it claims."""
    token = jwt.encode({"sub": "alice", "exp": 4_000_000_000}, None, algorithm="none")
    assert _reason(token) == "invalid"


def test_other_algorithm_is_invalid() -> None:
    """A token signed with the right secret but another algorithm (HS512) is refused."""
    secret = SECRET * 2  # 64+ bytes: no short-key warning for HS512
    token = jwt.encode({"sub": "alice", "exp": 4_000_000_000}, secret, algorithm="HS512")
    assert _reason(token, secret) == "invalid"


def test_auth_error_is_a_netra_error() -> None:
    """``AuthError`` belongs to the package's exception hierarchy and carries a ``reason``."""
    error = AuthError("expired", "token has expired")
    assert isinstance(error, NetraError)
    assert error.reason == "expired"
    assert str(error) == "token has expired"
