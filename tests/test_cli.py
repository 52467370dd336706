"""The ``netra-actors`` command (netra_actors._cli): ``token`` and argument parsing; no server is started."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from netra_actors import Runtime, _cli
from netra_actors._auth import SECRET_FILE, load_secret, verify_token
from netra_actors._cli import SERVE_FLAGS, main
from netra_actors._config import ENV_PREFIX, Config
from netra_actors._exceptions import AuthError

SECRET = "cli-test-secret-long-enough-for-hs256-0123456789"


@pytest.fixture(autouse=True)
def _no_netra_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``NETRA_ACTORS_*`` variables of the outer environment out of these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def logging_setup(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Record ``logging.basicConfig`` calls instead of changing the root logger."""
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(_cli.logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
    return calls


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, logging_setup: list[dict[str, object]]) -> list[Config]:
    """Replace the server with a stub that records the ``Config`` it would have served."""
    configs: list[Config] = []

    async def fake_serve(config: Config) -> None:
        configs.append(config)

    monkeypatch.setattr(_cli, "_serve", fake_serve)
    return configs


def _token(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return out.strip()


def _claims(token: str) -> dict[str, object]:
    return jwt.decode(token, options={"verify_signature": False})


# --- token -----------------------------------------------------------------------------------------


def test_token_verifies_with_the_data_dir_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``token USER --data-dir D`` prints one token that verifies as USER with D's secret."""
    token = _token(capsys, ["token", "alice", "--data-dir", str(tmp_path)])
    assert verify_token(token, load_secret(Config(data_dir=tmp_path))) == "alice"
    assert (tmp_path / SECRET_FILE).exists()


def test_tokens_from_the_same_data_dir_share_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second ``token`` run reuses the secret file the first one created."""
    first = _token(capsys, ["token", "alice", "--data-dir", str(tmp_path)])
    secret = (tmp_path / SECRET_FILE).read_bytes()
    second = _token(capsys, ["token", "bob", "--data-dir", str(tmp_path)])
    assert (tmp_path / SECRET_FILE).read_bytes() == secret
    assert verify_token(first, secret.strip()) == "alice"
    assert verify_token(second, secret.strip()) == "bob"


def test_token_with_another_data_dir_does_not_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token is bound to its data folder's secret."""
    token = _token(capsys, ["token", "alice", "--data-dir", str(tmp_path / "a")])
    with pytest.raises(AuthError, match="invalid"):
        verify_token(token, load_secret(Config(data_dir=tmp_path / "b")))


def test_token_ttl_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--ttl`` sets the token's lifetime in seconds."""
    before = int(time.time())
    claims = _claims(_token(capsys, ["token", "alice", "--ttl", "60", "--data-dir", str(tmp_path)]))
    assert claims["exp"] == claims["iat"] + 60  # type: ignore[operator]
    assert before <= claims["iat"] <= time.time()  # type: ignore[operator]


def test_token_default_ttl_is_the_configured_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``--ttl`` the lifetime is ``token_ttl``: the default, or ``NETRA_ACTORS_TOKEN_TTL``."""
    claims = _claims(_token(capsys, ["token", "alice", "--data-dir", str(tmp_path)]))
    assert claims["exp"] == claims["iat"] + 86_400  # type: ignore[operator]
    monkeypatch.setenv("NETRA_ACTORS_TOKEN_TTL", "120")
    claims = _claims(_token(capsys, ["token", "alice", "--data-dir", str(tmp_path)]))
    assert claims["exp"] == claims["iat"] + 120  # type: ignore[operator]


def test_token_uses_the_configured_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``NETRA_ACTORS_SECRET`` set, the token is signed with it and no secret file is made."""
    monkeypatch.setenv("NETRA_ACTORS_SECRET", SECRET)
    token = _token(capsys, ["token", "carol", "--data-dir", str(tmp_path)])
    assert verify_token(token, SECRET.encode()) == "carol"
    assert not (tmp_path / SECRET_FILE).exists()


def test_token_data_dir_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``NETRA_ACTORS_DATA_DIR`` chooses the data folder when ``--data-dir`` is absent."""
    monkeypatch.setenv("NETRA_ACTORS_DATA_DIR", str(tmp_path / "env"))
    token = _token(capsys, ["token", "dave"])
    assert verify_token(token, load_secret(Config(data_dir=tmp_path / "env"))) == "dave"


def test_token_for_empty_user_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty user name exits with status 2 and a message, not a traceback."""
    assert main(["token", "", "--data-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "netra-actors:" in captured.err


def test_infinite_ttl_is_refused_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ttl inf`` exits with status 2 and a message instead of a traceback."""
    assert main(["token", "alice", "--ttl", "inf", "--data-dir", str(tmp_path)]) == 2


# --- argument parsing --------------------------------------------------------------------------------


def test_serve_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """``serve --help`` exits 0 and lists every serve flag, including ``--port``, but no ``--secret``."""
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out
    for name in SERVE_FLAGS:
        assert "--" + name.replace("_", "-") in out
    assert "--secret" not in out


def test_token_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``token --help`` exits 0 and documents USER, ``--ttl`` and ``--data-dir``."""
    with pytest.raises(SystemExit) as info:
        main(["token", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "USER" in out
    assert "--ttl" in out
    assert "--data-dir" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["token"],
        ["token", "alice", "--ttl", "soon"],
        ["token", "alice", "--port", "1"],
        ["serve", "--no-such-flag"],
        ["serve", "--secret", SECRET],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A missing command or argument, an unknown flag, or a bad ``--ttl`` exits with status 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "80.5", ""])
def test_invalid_port_exits_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``serve --port`` with a value that is not an integer exits with status 2 (usage error)."""
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", value])
    assert info.value.code == 2


def test_serve_builds_its_config_from_flags_over_environment(
    served: list[Config],
    logging_setup: list[dict[str, object]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve`` flags override ``NETRA_ACTORS_*`` variables, which override defaults; logging follows."""
    monkeypatch.setenv("NETRA_ACTORS_PORT", "9000")
    monkeypatch.setenv("NETRA_ACTORS_HOST", "0.0.0.0")
    assert main(["serve", "--port", "9001", "--max-steps", "3", "--log-level", "warning"]) == 0
    [config] = served
    assert (config.port, config.host, config.max_steps) == (9001, "0.0.0.0", 3)
    assert config.log_level == "warning"
    assert config.agent == "demo"
    assert [call["level"] for call in logging_setup] == ["WARNING"]


def test_serve_refuses_invalid_values_before_serving(
    served: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-positive value exits with status 2 and a message, and nothing is served."""
    assert main(["serve", "--max-steps", "0"]) == 2
    assert served == []
    assert "max_steps" in capsys.readouterr().err


@pytest.fixture
def gc_thresholds() -> Iterator[None]:
    """Python's garbage-collector thresholds as they were before the test."""
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@pytest.mark.usefixtures("gc_thresholds")
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], (700, 10, 100)),
        (["--gc-thresholds", "2000,20,50"], (2000, 20, 50)),
    ],
)
def test_serve_sets_the_garbage_collector_thresholds(
    served: list[Config], argv: list[str], expected: tuple[int, int, int]
) -> None:
    """The server process collects its oldest generation ten times less often than
    Python would (or as the flag says)."""
    gc.set_threshold(700, 10, 10)
    assert main(["serve", *argv]) == 0
    assert served
    assert gc.get_threshold() == expected


@pytest.mark.usefixtures("gc_thresholds")
def test_serve_can_leave_the_garbage_collector_alone(
    served: list[Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``none`` keeps the process's own thresholds."""
    gc.set_threshold(123, 4, 5)
    monkeypatch.setenv("NETRA_ACTORS_GC_THRESHOLDS", "none")
    assert main(["serve"]) == 0
    assert gc.get_threshold() == (123, 4, 5)


@pytest.mark.parametrize("value", ["700,10", "a,b,c", "700,-1,10", "1,2,3,4"])
def test_bad_gc_thresholds_are_refused_before_serving(
    served: list[Config], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anything but three integers >= 0 exits with status 2 and names the setting."""
    assert main(["serve", "--gc-thresholds", value]) == 2
    assert served == []
    assert "gc_thresholds" in capsys.readouterr().err


async def test_an_embedded_runtime_leaves_the_garbage_collector_alone() -> None:
    """Only the server process tunes the collector: a runtime running a run, whatever its
    ``gc_thresholds``, changes nothing."""
    before = gc.get_threshold()
    async with Runtime(Config(store="memory", gc_thresholds="1,1,1")) as runtime:
        run = await runtime.start_run("alice", "what is 2+3?")
        assert (await run.collect())[-1].type == "agent_completed"
        assert gc.get_threshold() == before


def test_banner_shows_url_and_token() -> None:
    """The startup banner names the WebSocket URL, the agent and a ready-to-use token URL."""
    config = Config(host="127.0.0.1", agent="demo")
    banner = _cli._banner(config, "ws://127.0.0.1:4321/ws", "TOKEN123")
    assert "ws://127.0.0.1:4321/ws" in banner
    assert "ws://127.0.0.1:4321/ws?token=TOKEN123" in banner
    assert "'demo'" in banner
