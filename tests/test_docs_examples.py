"""The examples in the README run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import trio

from netra_actors.testing import check_lifecycle

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


async def test_readme_in_process_example_runs(
    capsys: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """The README's in-process example prints a complete, well-ordered demo run
    (run in a fresh folder: by default the runtime keeps its store in ./.netra_actors)."""
    monkeypatch.chdir(tmp_path)
    block = next(b for b in _python_blocks(ROOT / "README.md") if "Runtime()" in b)
    namespace: dict[str, Any] = {}
    exec(block.replace("trio.run(main)", ""), namespace)
    with trio.fail_after(10):
        await namespace["main"]()
    lines = capsys.readouterr().out.splitlines()
    types = [line.split()[1] for line in lines]
    assert types[0] == "agent_started"
    assert types[-1] == "agent_completed"
    assert "tool_executing" in types
    assert "14" in lines[-1]
    assert [int(line.split()[0]) for line in lines] == list(range(1, len(lines) + 1))
    assert (tmp_path / ".netra_actors" / "netra.sqlite3").exists()


def test_readme_names_the_two_commands() -> None:
    """The README's set-up is `make run` and `make test`, and both targets exist."""
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, flags=re.M)


def test_protocol_example_transcript_is_lawful() -> None:
    """The example session in docs/protocol.md obeys the lifecycle rules it documents."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    frames = [line[2:] for line in text.splitlines() if line.startswith("< {")]
    assert frames
    check_lifecycle(frames)


async def test_readme_client_example_runs(live_server: Any, capsys: Any) -> None:
    """The README's client example, pointed at a live server, prints a complete demo run."""
    block = next(b for b in _python_blocks(ROOT / "README.md") if "client.connect" in b)
    source = block.replace("ws://127.0.0.1:8765/ws", live_server.url)
    namespace: dict[str, Any] = {}
    exec(source.replace('trio.run(main, "PASTE-TOKEN-HERE")', ""), namespace)
    with trio.fail_after(20):
        await namespace["main"](live_server.token("readme"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[1] == "agent_started"
    assert lines[-1].split()[1] == "agent_completed"
    assert "14" in lines[-1]
