"""Every Python example of the documentation site runs as written, and examples/ compiles.

Each ```python block of the pages in ``PAGES`` is executed as a script (``__main__``) in
a fresh folder. Blocks that connect to ``ws://127.0.0.1:8765/ws`` with
``"PASTE-TOKEN-HERE"`` are pointed at a real demo server (in a thread of its own, with a
free port) and given a valid token; blocks that call an OpenAI-compatible endpoint get a
local fake one. None is exempt. The blocks of
embedding.md that test_aio.py and test_asgi.py run with their own checks, and the
README's (test_docs_examples.py), are left to those tests.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_openai import answer_stream, open_fake_openai

from netra_actors import Config, Runtime, issue_token, serve

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [
    "tutorial.md",
    "howto/browser-client.md",
    "howto/real-llm.md",
    "howto/configure.md",
    "howto/benchmarks.md",
    "howto/deploy.md",
    "reference/cli.md",
    "reference/configuration.md",
    "explanation.md",
    "llm-and-tools.md",
    "observability.md",
    "embedding.md",
]
#: Names the examples of a page take as given (defined in the page's prose, not its code).
PRELUDES = {
    "llm-and-tools.md": "from netra_actors import Config\n"
    "from netra_actors._agents import demo_llm\n"
    'config = Config(store="memory")\n'
    "provider = demo_llm()\n",
    "observability.md": "from opentelemetry.sdk.trace import TracerProvider\n"
    "from netra_actors import Config\n"
    'config = Config(store="memory")\n'
    "my_tracer_provider = TracerProvider()\n",
}
#: Blocks that other tests run with their own checks (the text that identifies each).
ELSEWHERE = {
    "embedding.md": (
        "serve, rt, config",  # test_aio.py: test_doc_plain_trio_example_runs
        "asyncio.run(main())",  # test_aio.py: test_doc_asyncio_example_runs
        "asyncio_tool(lookup_order)",  # test_aio.py: test_doc_asyncio_tool_example
        "WebSocketRoute(",  # test_asgi.py: test_doc_starlette_example_serves
    ),
}
DOC_URL = "ws://127.0.0.1:8765/ws"
DOC_TOKEN = "PASTE-TOKEN-HERE"
#: An example that talks to this OpenAI-compatible endpoint gets a fake one instead.
DOC_LLM = "http://127.0.0.1:8000/v1"
SECRET = "docs-examples-secret-0123456789abcdef"

_BLOCK = re.compile(r"(?P<before>[^\n]*)\n+```python\n(?P<code>.*?)```", re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block: every one of them runs."""
    return [
        (text.count("\n", 0, match.start("code")) + 1, match.group("code"))
        for match in _BLOCK.finditer(text)
    ]


def _cases() -> list[Any]:
    cases = []
    for page in PAGES:
        for line, code in python_blocks((DOCS / page).read_text()):
            if any(marker in code for marker in ELSEWHERE.get(page, ())):
                continue
            cases.append(pytest.param(page, line, code, id=f"{page}:{line}"))
    return cases


class _InThread:
    """``serve_until(stop)`` run by ``trio.run`` in a thread of its own, for the block's
    duration (the examples call ``trio.run`` themselves on the test's thread)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        await self.serve_until(self._stop)

    async def serve_until(self, stop: trio.Event) -> None:
        raise NotImplementedError

    def ready(self) -> None:
        self._ready.set()

    def __enter__(self) -> _InThread:
        self._thread.start()
        assert self._ready.wait(20), f"{type(self).__name__} did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(20)


class DemoServer(_InThread):
    """The demo runtime served on a free port."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__()
        self.config = Config(
            host="127.0.0.1", port=0, data_dir=data_dir, secret=SECRET, store="memory"
        )
        self.url = ""

    async def serve_until(self, stop: trio.Event) -> None:
        async with Runtime(self.config) as runtime, trio.open_nursery() as nursery:
            info = await nursery.start(serve, runtime, self.config)
            self.url = f"ws://127.0.0.1:{info.port}/ws"
            self.ready()
            await stop.wait()
            nursery.cancel_scope.cancel()

    def token(self, user_id: str) -> str:
        return issue_token(user_id, SECRET.encode(), ttl=600)


class FakeLLM(_InThread):
    """tests/fake_openai.py's server, answering every request "Hello there!"."""

    def __init__(self) -> None:
        super().__init__()
        self.base_url = ""

    async def serve_until(self, stop: trio.Event) -> None:
        async with open_fake_openai(responder=lambda _: answer_stream("Hello", " there!")) as fake:
            self.base_url = fake.base_url
            self.ready()
            await stop.wait()


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    with DemoServer(tmp_path_factory.mktemp("server")) as server:
        yield server


def _run_block(code: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(code, name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize(("page", "line", "code"), _cases())
def test_docs_python_example_runs(
    page: str,
    line: int,
    code: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """The example runs to the end without an exception (in a fresh folder)."""
    name = f"docs/{page}:{line}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NETRA_ACTORS_SECRET", raising=False)
    if DOC_URL in code or DOC_TOKEN in code:
        server: DemoServer = request.getfixturevalue("demo_server")
        code = code.replace(DOC_URL, server.url).replace(DOC_TOKEN, server.token("docs"))
    if DOC_LLM in code:
        code = code.replace(DOC_LLM, request.getfixturevalue("fake_llm").base_url)
    _run_block(PRELUDES.get(page, "") + code, name)
    out = capsys.readouterr().out
    # Examples that stream a run print how it ended, and it did not fail.
    if any(marker in code for marker in ("events()", "collect()", "get_message()", "c.run(")):
        assert re.search(r"agent_(completed|cancelled)|final_response|words", out), out
        assert "agent_error" not in out, out


def _node_with_websocket() -> list[str] | None:
    """The command that runs Node with the WebSocket global (built in from Node 22,
    behind a flag in Node 20 and 21), or None."""
    node = shutil.which("node")
    if node is None:
        return None
    for command in ([node], [node, "--experimental-websocket"]):
        probe = subprocess.run(
            [*command, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            capture_output=True,
            timeout=20,
        )
        if probe.returncode == 0:
            return command
    return None


def _javascript_cases() -> list[Any]:
    cases = []
    for page in PAGES:
        text = (DOCS / page).read_text()
        for match in re.finditer(r"```javascript\n(.*?)```", text, re.S):
            line = text.count("\n", 0, match.start(1)) + 1
            cases.append(pytest.param(page, match.group(1), id=f"{page}:{line}"))
    return cases


@pytest.mark.parametrize(("page", "code"), _javascript_cases())
def test_docs_javascript_example_runs(
    page: str, code: str, tmp_path: Path, demo_server: DemoServer
) -> None:
    """The browser snippet, run by Node's WebSocket (the browser's API) against the demo
    server, shows a complete run and stops at its terminal event."""
    node = _node_with_websocket()
    # This kind of machine has Node.js 20: a missing one is a broken setup, not a reason
    # to leave the browser snippet untested.
    assert node is not None, "needs Node.js with the WebSocket global (Node 20 or newer)"
    script = tmp_path / "example.mjs"
    script.write_text(
        code.replace(DOC_URL, demo_server.url).replace(DOC_TOKEN, demo_server.token("js"))
    )
    result = subprocess.run(
        [*node, "--no-warnings", str(script)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("session ")
    assert "agent_completed" in lines[-1], result.stdout
    assert "14" in lines[-1], result.stdout
    seqs = [int(line.split()[0]) for line in lines if line.split()[0].isdigit()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_every_page_with_python_is_covered() -> None:
    """Every page of the site with a ```python block is in PAGES."""
    with_python = {
        str(path.relative_to(DOCS))
        for path in DOCS.rglob("*.md")
        if python_blocks(path.read_text())
    }
    assert with_python <= set(PAGES)


def test_tutorial_examples_print_what_the_tutorial_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first agent answers HELLO ACTORS; the first tool counts three words; the
    model-driven tool run ends with the word count."""
    monkeypatch.chdir(tmp_path)
    blocks = [code for _, code in python_blocks((DOCS / "tutorial.md").read_text())]
    echo = next(b for b in blocks if "async def echo" in b)
    _run_block(echo, "echo")
    assert "HELLO ACTORS" in capsys.readouterr().out.splitlines()[-1]
    counter = next(b for b in blocks if "async def counter" in b)
    _run_block(counter, "counter")
    assert "3 words" in capsys.readouterr().out.splitlines()[-1]
    scripted = next(b for b in blocks if "ScriptedLLMProvider" in b)
    _run_block(scripted, "scripted")
    lines = capsys.readouterr().out.splitlines()
    assert "tool_completed" in lines[0]
    assert lines[-1] == "That is 4 words."


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: f"examples/{p.name}"
)
def test_examples_import(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each file of examples/ compiles and imports (test_asgi.py runs fastapi_app.py)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETRA_ACTORS_SECRET", SECRET)
    compile(path.read_text(), str(path), "exec")
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
