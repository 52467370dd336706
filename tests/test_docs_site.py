"""The documentation site builds (``mkdocs build --strict``) and its reference pages match the code.

The CLI and configuration references have generated sections, between
``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->``, rendered from the argparse
parser and from ``attrs.fields(Config)``. After changing a flag or a field, rewrite
them with::

    .venv/bin/python tests/test_docs_site.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import netra_actors
from netra_actors import Config
from netra_actors._cli import _parser
from netra_actors._config import ENV_PREFIX

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLI_PAGE = DOCS / "reference" / "cli.md"
CONFIG_PAGE = DOCS / "reference" / "configuration.md"
API_PAGE = DOCS / "reference" / "api.md"
BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"
_ENV_DEFAULT = re.compile(r"\s*\(env (?P<env>\S+), default (?P<default>.*)\)$", re.S)


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# -- the CLI --------------------------------------------------------------------------------


def commands(
    parser: argparse.ArgumentParser | None = None,
    path: tuple[str, ...] = ("netra-actors",),
    summary: str = "",
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """``(path, parser, help)`` of every command that takes arguments itself (the leaves)."""
    parser = parser or _parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser, summary
    for action in subparsers:
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            yield from commands(sub, (*path, name), helps.get(name, ""))


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def render_cli() -> str:
    """The generated part of docs/reference/cli.md: one table per command."""
    out: list[str] = []
    for path, parser, summary in commands():
        command = " ".join(path)
        positionals = " ".join(
            a.metavar or a.dest for a in _arguments(parser) if not a.option_strings
        )
        out += [f"### `{command}`", ""]
        out += [f"Usage: `{command}{' ' + positionals if positionals else ''} [OPTIONS]`", ""]
        if summary:
            out += [f"{summary[0].upper()}{summary[1:]}.", ""]
        out += [
            "| argument | environment variable | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for action in _arguments(parser):
            name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar}`"
            if action.option_strings and action.nargs != 0:
                name = name[:-1] + f" {action.metavar or action.dest.upper()}`"
            if action.choices:
                name += " (" + "\\|".join(str(c) for c in action.choices) + ")"
            help_text = action.help or ("" if action.option_strings else "required")
            env = default = ""
            if match := _ENV_DEFAULT.search(help_text):
                env, default = f"`{match['env']}`", match["default"]
                help_text = help_text[: match.start()]
            elif action.default not in (None, False, argparse.SUPPRESS):
                default = str(action.default)
            out.append(
                f"| {name} | {env} | {_cell(default) and f'`{_cell(default)}`'} | {_cell(help_text)} |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# -- the configuration ----------------------------------------------------------------------


def _default(field: attrs.Attribute[object]) -> str:
    value = field.default
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(value) or "(empty)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def render_config() -> str:
    """The generated part of docs/reference/configuration.md: one row per Config field."""
    out = [
        "| field | CLI flag | environment variable | type | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    flags = {
        option
        for _, parser, _ in commands()
        for a in _arguments(parser)
        for option in a.option_strings
    }
    for field in attrs.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        flag = f"`{flag}`" if flag in flags else "(environment only)"
        out.append(
            f"| `{field.name}` | {flag} | `{ENV_PREFIX}{field.name.upper()}` | "
            f"`{_cell(field.type)}` | `{_cell(_default(field))}` | "
            f"{_cell(field.metadata.get('help', ''))} |"
        )
    return "\n".join(out) + "\n"


# -- the generated sections -----------------------------------------------------------------


def generated(page: Path) -> str:
    text = page.read_text()
    assert text.count(BEGIN) == 1, f"{page}: no generated section"
    assert text.count(END) == 1, f"{page}: no generated section"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_generated(page: Path, content: str) -> None:
    text = page.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    page.write_text(f"{head}{BEGIN}\n\n{content}\n{END}{tail}")


def test_cli_page_lists_every_command_and_flag() -> None:
    """docs/reference/cli.md names every subcommand and every flag of the parser."""
    page = generated(CLI_PAGE)
    missing = []
    for path, parser, _ in commands():
        if f"### `{' '.join(path)}`" not in page:
            missing.append(" ".join(path))
        for action in _arguments(parser):
            for option in action.option_strings:
                if f"`{option}" not in page.split(f"### `{' '.join(path)}`", 1)[-1]:
                    missing.append(f"{' '.join(path)} {option}")
    assert not missing, (
        f"docs/reference/cli.md misses {missing}: run `.venv/bin/python tests/test_docs_site.py`"
    )


def test_configuration_page_matches_config_fields() -> None:
    """docs/reference/configuration.md has one row per Config field, with its default,
    flag and environment variable, exactly as attrs.fields(Config) says."""
    assert generated(CONFIG_PAGE) == render_config(), (
        "docs/reference/configuration.md is out of date: "
        "run `.venv/bin/python tests/test_docs_site.py`"
    )
    rows = [line for line in generated(CONFIG_PAGE).splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [f.name for f in attrs.fields(Config)]


def test_api_page_documents_every_public_name() -> None:
    """docs/reference/api.md has a ``::: netra_actors.NAME`` directive for every name of
    ``netra_actors.__all__``, and one for each public module."""
    directives = set(re.findall(r"^::: netra_actors\.(\S+)$", API_PAGE.read_text(), re.M))
    modules = {"client", "testing", "aio", "asgi"}
    assert set(netra_actors.__all__) | modules == directives


# -- command lines in the pages ------------------------------------------------------------


def command_lines() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``netra-actors`` command in the ```sh blocks of the
    pages and the README (env assignments, comments, continuations, pipes and ``&`` removed)."""
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    words.pop(0)
                for stop in ("|", "&", "&&", ";", ">", "2>&1"):
                    if stop in words:
                        words = words[: words.index(stop)]
                if words and words[0].endswith("netra-actors"):
                    found.append((f"{path.relative_to(ROOT)}: {line.strip()}", words[1:]))
    return found


def test_documented_command_lines_parse() -> None:
    """Every ``netra-actors ...`` command shown in the docs is accepted by the parser
    (subcommands, flags, and values such as ``--sqlite-synchronous FULL``)."""
    lines = command_lines()
    assert len(lines) > 20
    for where, argv in lines:
        try:
            _parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: refused by the parser")


# -- the site -------------------------------------------------------------------------------


def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page in the nav exists, no broken link or
    anchor, the API reference renders from the docstrings without a warning."""
    # `make test` installs the docs extra: the site is always built, never skipped.
    assert importlib.util.find_spec("mkdocs") is not None, (
        "mkdocs is not installed: install the docs extra (pip install -e '.[docs]') "
        "to build the documentation site"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "reference" / "api" / "index.html").is_file()
    api = (tmp_path / "reference" / "api" / "index.html").read_text()
    assert "start_run" in api  # rendered from Runtime's docstrings


if __name__ == "__main__":
    write_generated(CLI_PAGE, render_cli())
    write_generated(CONFIG_PAGE, render_config())
    print(f"rewrote the generated sections of {CLI_PAGE} and {CONFIG_PAGE}")
