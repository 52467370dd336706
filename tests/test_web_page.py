"""The web page over real HTTP: ``GET /`` and its static files, on the port of ``/ws``.

The page itself is driven in a real browser by tests/test_web_browser.py.
"""

from __future__ import annotations

import re

import pytest
import trio
from conftest import LiveServer
from wsclient import http_get

pytestmark = pytest.mark.network

TIMEOUT = 30


async def test_get_root_serves_the_page(live_server: LiveServer) -> None:
    """GET / answers 200 HTML (also with a ``?token=`` query) that loads only local files."""
    with trio.fail_after(TIMEOUT):
        for target in ("/", "/?token=abc"):
            answer = await http_get(live_server.port, target)
            assert answer.status == 200
            assert answer.headers["content-type"] == "text/html; charset=utf-8"
            assert answer.headers["cache-control"] == "no-store"
            assert answer.headers["x-content-type-options"] == "nosniff"
            html = answer.body.decode()
            assert html.startswith("<!doctype html>")
            assert '<script src="/static/app.js"' in html
            assert 'href="/static/style.css"' in html
            # Accessible names the spec asks for.
            assert '<label for="message">Message</label>' in html
            assert ">Send</button>" in html
            # Offline: no external URL anywhere (no CDN).
            assert not re.search(r"(?:src|href)=\"(?:https?:)?//", html)


@pytest.mark.parametrize(
    ("path", "content_type", "marker"),
    [
        ("/static/app.js", "text/javascript; charset=utf-8", b'"use strict";'),
        ("/static/style.css", "text/css; charset=utf-8", b".timeline"),
    ],
)
async def test_static_files_are_served(
    live_server: LiveServer, path: str, content_type: str, marker: bytes
) -> None:
    """The page's script and style sheet: right content type, not cached, no external URL."""
    with trio.fail_after(TIMEOUT):
        answer = await http_get(live_server.port, path)
        assert answer.status == 200
        assert answer.headers["content-type"] == content_type
        assert answer.headers["cache-control"] == "no-store"
        assert marker in answer.body
        assert b"http://" not in answer.body
        assert b"https://" not in answer.body


async def test_unknown_static_file_is_404(live_server: LiveServer) -> None:
    """Only the page's own files are served: nothing else under /static/."""
    with trio.fail_after(TIMEOUT):
        for path in ("/static/", "/static/../_gateway.py", "/static/index.html", "/index.html"):
            answer = await http_get(live_server.port, path)
            assert answer.status == 404, path
            assert answer.json()["error"] == "not_found"
