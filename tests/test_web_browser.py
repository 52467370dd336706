"""The web page in a real browser: headless Chromium (the system's) driven by Playwright.

``netra-actors serve`` runs as a subprocess; each test opens the page at ``GET /`` in a
fresh browser context and fails on any JavaScript error (``pageerror``) or console
error. Screenshots go to ``test-artifacts/``.

The browser is Debian's ``chromium`` package at /usr/bin/chromium (``make test`` runs
scripts/ensure-test-tools, which installs it when it can); Playwright never downloads
one. Without it these tests fail, saying what to install: they are never skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Error,
    Locator,
    Page,
    Playwright,
    WebSocketRoute,
    expect,
    sync_playwright,
)

from netra_actors import issue_token

pytestmark = pytest.mark.network

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SECRET = "netra-actors-browser-test-secret-0123456789abcdef"
BANNER_URL = re.compile(r"serving protocol v1 at ws://127\.0\.0\.1:(\d+)/ws")
#: Playwright's auto-waiting assertions wait at most this long (ms).
WAIT_MS = 15_000


@attrs.define
class Server:
    """A ``netra-actors serve`` subprocess and the address of its page."""

    process: subprocess.Popen[str]
    port: int
    output: list[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page_url(self, user: str) -> str:
        return f"{self.base}/?token={issue_token(user, SECRET.encode(), ttl=600)}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("web-data")
    env = {**os.environ, "NETRA_ACTORS_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    command = [
        *(sys.executable, "-m", "netra_actors", "serve"),
        *("--host", "127.0.0.1", "--port", "0"),
        *("--store", "memory", "--data-dir", str(data_dir)),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    output: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def drain() -> None:  # read stdout to its end, so the pipe never fills
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if not found.is_set() and (match := BANNER_URL.search(line)):
                port.append(int(match.group(1)))
                found.set()
        found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert found.wait(30), "netra-actors serve printed no URL within 30 s"
        assert port, f"netra-actors serve exited: {''.join(output)}"
        yield Server(process, port[0], output)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(5)
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the browser tests need {CHROMIUM}: install Debian's chromium package "
            "(apt-get install chromium, as root; `make test` runs scripts/ensure-test-tools)",
            pytrace=False,
        )
    playwright: Playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            launched.close()
    finally:
        playwright.stop()


@attrs.define
class Watched:
    """A page and the JavaScript errors and console errors seen on it."""

    page: Page
    errors: list[str] = attrs.field(factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def on_pageerror(self, error: Error) -> None:
        self.errors.append(f"pageerror: {error}")


@pytest.fixture
def watched(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Watched]:
    """A page in a fresh context (its own sessionStorage); no JavaScript error allowed."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    watched = Watched(page)
    # Plain functions: Playwright tags bound-method handlers with an attribute (no slots).
    page.on("console", lambda message: watched.on_console(message))
    page.on("pageerror", lambda error: watched.on_pageerror(error))
    try:
        yield watched
        assert watched.errors == [], watched.errors
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        if not page.is_closed():
            page.screenshot(path=ARTIFACTS / f"web-{request.node.name}.png", full_page=True)
        context.close()


def open_page(watched: Watched, server: Server, user: str) -> Page:
    """Open the page signed in through ``?token=``; wait until it is connected."""
    page = watched.page
    page.goto(server.page_url(user))
    expect(page.get_by_role("status")).to_have_text(re.compile(r"^Connected as "))
    return page


def send(page: Page, text: str, *, enter: bool = False) -> Locator:
    """Send ``text`` (with the Send button, or Enter); the card of the run it started."""
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    if enter:
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        box.press("Enter")
    else:
        page.get_by_role("button", name="Send").click()
    run = page.locator("li.run").filter(has=page.locator(".question", has_text=text)).last
    expect(run).to_have_attribute("data-run-id", re.compile(r".+"))
    return run


def tool_call(run: Locator, tool: str) -> Locator:
    return run.locator("li.event-tool_executing").filter(has_text=tool)


def seqs(run: Locator) -> list[int]:
    """The seq of every event in the run's timeline (a coalesced row covers several)."""
    rows = run.locator("li.event").evaluate_all(
        "rows => rows.map(r => [Number(r.dataset.seq), Number(r.dataset.lastSeq)])"
    )
    return [seq for first, last in rows for seq in range(first, last + 1)]


def test_calculator_run_shows_the_tool_call_and_the_answer(
    watched: Watched, server: Server
) -> None:
    """'what is 2+3*4?': the timeline shows the calculator call (parameters, status,
    duration) and the terminal event; the answer 14 streams in."""
    page = open_page(watched, server, "web-calc")
    # The token left the address bar (it is kept in sessionStorage for reloads).
    assert "token=" not in page.url
    run = send(page, "what is 2+3*4?")
    expect(run.locator(".answer")).to_have_text("2+3*4 = 14")
    expect(run.locator(".run-status")).to_have_text("completed")
    call = tool_call(run, "calculator")
    expect(call).to_have_count(1)
    expect(call.locator(".tool-params")).to_have_text('{"expression":"2+3*4"}')
    expect(call.locator(".tool-status")).to_have_text("ok")
    expect(call.locator(".tool-duration")).to_have_text(re.compile(r"^\d+(\.\d)? ms$"))
    result = run.locator("li.event-tool_completed")
    expect(result.locator(".tool-outcome")).to_have_text("→ 14")
    for kind in ("agent_started", "agent_thinking", "partial_result", "agent_completed"):
        expect(run.locator(f"li.event-{kind}")).not_to_have_count(0)
    expect(run.locator("li.event").last).to_have_attribute("data-type", "agent_completed")
    expect(run.get_by_role("button", name="Cancel")).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page.png", full_page=True)


def test_cancel_a_long_run(watched: Watched, server: Server) -> None:
    """'sleep 30' then Cancel: the tool ends cancelled and the run with agent_cancelled."""
    page = open_page(watched, server, "web-cancel")
    run = send(page, "sleep 30")
    call = tool_call(run, "sleep")
    expect(call.locator(".tool-status")).to_have_text("running")
    expect(call.locator(".tool-params")).to_have_text('{"seconds":30}')
    run.get_by_role("button", name="Cancel").click()
    expect(run.locator(".run-status")).to_have_text("cancelled")
    expect(call.locator(".tool-status")).to_have_text("cancelled")
    terminal = run.locator("li.event").last
    expect(terminal).to_have_attribute("data-type", "agent_cancelled")
    expect(terminal).to_contain_text("reason client")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)


def test_reload_mid_run_resumes_the_timeline(watched: Watched, server: Server) -> None:
    """Reload during a run: the page signs in again (sessionStorage), replays the
    session's events once each and follows the run to its end."""
    page = open_page(watched, server, "web-reload")
    run = send(page, "sleep 2")
    expect(tool_call(run, "sleep").locator(".tool-status")).to_have_text("running")
    before = seqs(run)
    page.reload()
    expect(page.get_by_role("status")).to_have_text(re.compile(r"^Connected as web-reload"))
    runs = page.locator("li.run")
    expect(runs).to_have_count(1)
    run = runs.first
    expect(run.locator(".question")).to_have_text("sleep 2")
    expect(run.locator(".run-status")).to_have_text("completed")
    expect(run.locator(".answer")).to_have_text("I slept for 2 seconds.")
    after = seqs(run)
    # Every event once, in order, none missing: those seen before the reload first.
    assert after[: len(before)] == before
    assert after == list(range(after[0], after[0] + len(after)))
    for kind in ("agent_started", "tool_executing", "tool_completed", "agent_completed"):
        expect(run.locator(f"li.event-{kind}")).to_have_count(1)
    expect(tool_call(run, "sleep").locator(".tool-status")).to_have_text("ok")


def test_dropped_connection_reconnects_and_resumes_after_the_last_seq(
    watched: Watched, server: Server
) -> None:
    """The connection drops mid-stream: the page shows it, reconnects with
    ``after_seq``/``session_id`` and the streamed answer arrives whole, once."""
    page = watched.page
    urls: list[str] = []
    dropped: list[WebSocketRoute] = []

    def relay(ws: WebSocketRoute) -> None:
        urls.append(ws.url)
        ws.connect_to_server()
        dropped.append(ws)

    page.route_web_socket(re.compile(r"/ws\?"), relay)
    open_page(watched, server, "web-drop")
    run = send(page, "sleep 1")
    expect(tool_call(run, "sleep").locator(".tool-status")).to_have_text("running")
    last_seq = max(seqs(run))
    dropped[0].close(code=4008, reason="test: lagging")
    expect(page.get_by_role("status")).to_have_text(re.compile("Reconnecting"))
    expect(page.get_by_role("status")).to_have_text(re.compile(r"^Connected as web-drop"))
    expect(run.locator(".run-status")).to_have_text("completed")
    expect(run.locator(".answer")).to_have_text("I slept for 1 seconds.")
    assert len(urls) == 2, urls
    assert f"after_seq={last_seq}" in urls[1]
    assert "session_id=" in urls[1]
    all_seqs = seqs(run)
    assert all_seqs == list(range(all_seqs[0], all_seqs[0] + len(all_seqs)))


def test_without_a_token_the_page_asks_for_one(watched: Watched, server: Server) -> None:
    """No ``?token=``: a sign-in form; a valid token connects; a streamed answer arrives."""
    page = watched.page
    page.goto(server.base + "/")
    expect(page.get_by_role("status")).to_have_text("Not connected")
    expect(page.get_by_role("textbox", name="Message")).to_be_hidden()
    page.get_by_label("Token").fill(issue_token("web-form", SECRET.encode(), ttl=600))
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("status")).to_have_text("Connected as web-form")
    run = send(page, "stream 50")
    expect(run.locator(".run-status")).to_have_text("completed")
    expect(run.locator(".answer")).to_have_text(" ".join(f"t{i}" for i in range(50)) + " ")
    coalesced = run.locator("li.event-partial_result")
    expect(coalesced).to_have_count(1)
    expect(coalesced.locator(".label")).to_have_text("answer \u00d750")  # multiplication sign


def test_failing_tool_and_failing_run_are_shown(watched: Watched, server: Server) -> None:
    """'fail': the tool call ends with status error (its error shown), the run still
    completes; 'crash': the run ends with agent_error. Sent with Enter."""
    page = open_page(watched, server, "web-fail")
    run = send(page, "fail", enter=True)
    expect(run.locator(".run-status")).to_have_text("completed")
    expect(tool_call(run, "fail").locator(".tool-status")).to_have_text("error")
    expect(run.locator("li.event-tool_completed .tool-outcome")).to_contain_text("tool_error")
    crashed = send(page, "crash", enter=True)
    expect(crashed.locator(".run-status")).to_have_text("failed")
    expect(crashed.locator("li.event").last).to_have_attribute("data-type", "agent_error")
    expect(crashed.locator(".answer")).to_contain_text("Error (agent_error)")
