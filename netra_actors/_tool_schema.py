"""JSON schemas for tools, derived from a function's signature and docstring (no I/O).

``schema_for(fn)`` maps annotations to JSON Schema (``str``, ``int``,
``float``, ``bool``, ``None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``,
``Literal[...]``, ``X | Y`` / ``Optional[X]``, ``Any``), takes each
parameter's description from a Google-style ``Args:`` section (or Sphinx
``:param name:`` lines), marks parameters without a default as required and
forbids unknown ones. ``ArgumentValidator`` checks a call's arguments against
the schema before the tool runs.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import jsonschema

_PRIMITIVES: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    dict: {"type": "object"},
    list: {"type": "array"},
}


def json_schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON schema of one annotation (``{}``, any value, when it is not understood)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return {}
    if annotation in _PRIMITIVES:
        return dict(_PRIMITIVES[annotation])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [json_schema_of(a) for a in args]
        if all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
            return {"type": [o["type"] for o in options]}
        return {"anyOf": options}
    if origin in (list, set, frozenset) or (origin is tuple and len(args) == 2 and args[1] is ...):
        return {"type": "array", "items": json_schema_of(args[0])} if args else {"type": "array"}
    if origin is tuple:
        return {"type": "array", "prefixItems": [json_schema_of(a) for a in args], "items": False}
    if origin in (dict, Mapping):
        schema: dict[str, Any] = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = json_schema_of(args[1])
        return schema
    return {}


_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters)\s*:\s*$")
_SECTION = re.compile(r"^\s*[A-Z][A-Za-z ]+:\s*$")
_ARG_LINE = re.compile(r"^(\s*)(\*{0,2}\w+)\s*(\((?:[^()]|\([^()]*\))*\))?\s*:\s*(.*)$")
_SPHINX = re.compile(r"^\s*:param\s+(?:\w+\s+)?(\w+)\s*:\s*(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """``(description, {parameter: description})`` from a Google or Sphinx docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    args_indent: int | None = None  # indentation of the Args: header while inside it
    entry_indent: int | None = None
    current: str | None = None
    sphinx_current: str | None = None
    for line in lines:
        if _ARGS_HEADER.match(line):
            args_indent, entry_indent, current = _indent(line), None, None
            continue
        if sphinx := _SPHINX.match(line):
            sphinx_current = sphinx.group(1)
            params[sphinx_current] = sphinx.group(2).strip()
            continue
        if sphinx_current is not None:
            if line.strip() and _indent(line) > 0 and not line.lstrip().startswith(":"):
                params[sphinx_current] = (params[sphinx_current] + " " + line.strip()).strip()
                continue
            sphinx_current = None
        if args_indent is not None:
            if not line.strip():
                continue
            if _indent(line) <= args_indent:
                args_indent, current = None, None  # a new section (or text) at the same level
            else:
                arg = _ARG_LINE.match(line)
                if arg and (entry_indent is None or _indent(line) <= entry_indent):
                    entry_indent = _indent(line)
                    current = arg.group(2).lstrip("*")
                    params[current] = arg.group(4).strip()
                elif current is not None:
                    params[current] = (params[current] + " " + line.strip()).strip()
                continue
        if not params and not _SECTION.match(line):
            summary.append(line)
    description = "\n".join(summary).strip().split("\n\n")[0].replace("\n", " ")
    return description, params


def schema_for(fn: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """``(description, parameters schema)`` of a tool function."""
    description, docs = parse_docstring(inspect.getdoc(fn))
    try:
        hints = get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to "any value"
        hints = {}
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = json_schema_of(hints.get(name, Any))
        if docs.get(name):
            prop["description"] = docs[name]
        if param.default is param.empty:
            required.append(name)
        elif _json_value(param.default):
            prop["default"] = param.default
        properties[name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return description, schema


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in value.items())
    return False


class ArgumentValidator:
    """Validates tool-call arguments against a parameters schema (JSON Schema 2020-12)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        jsonschema.Draft202012Validator.check_schema(schema)
        self._validator = jsonschema.Draft202012Validator(schema)

    def errors(self, arguments: Mapping[str, Any]) -> list[str]:
        """Readable problems with ``arguments``; empty when they are valid."""
        problems = []
        for error in sorted(
            self._validator.iter_errors(dict(arguments)), key=lambda e: list(e.path)
        ):
            where = ".".join(str(p) for p in error.path)
            problems.append(f"{where}: {error.message}" if where else error.message)
        return problems
