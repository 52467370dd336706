"""Tool schemas: JSON Schema derived from signatures and docstrings, the ``@tool``
decorator, and the ``ArgumentValidator`` that checks a model's arguments.

Pure functions, no I/O and no clock: everything here is synchronous.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable
from typing import Any, Literal, Optional

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netra_actors import Tool, ToolError, ToolRegistry, tool
from netra_actors._tool_schema import (
    ArgumentValidator,
    json_schema_of,
    parse_docstring,
    schema_for,
)

# --- json_schema_of: one annotation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (str, {"type": "string"}),
        (int, {"type": "integer"}),
        (float, {"type": "number"}),
        (bool, {"type": "boolean"}),
        (type(None), {"type": "null"}),
        (list[int], {"type": "array", "items": {"type": "integer"}}),
        (tuple[int, ...], {"type": "array", "items": {"type": "integer"}}),
        (dict[str, float], {"type": "object", "additionalProperties": {"type": "number"}}),
        (Literal["a", "b"], {"enum": ["a", "b"]}),
        (int | None, {"type": ["integer", "null"]}),
        (Optional[str], {"type": ["string", "null"]}),  # noqa: UP045 (the old spelling on purpose)
        (Any, {}),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else "",
)
def test_json_schema_of_each_supported_annotation(
    annotation: Any, expected: dict[str, Any]
) -> None:
    """Each supported annotation maps to its JSON Schema fragment."""
    assert json_schema_of(annotation) == expected


def test_json_schema_of_unknown_annotation_accepts_any_value() -> None:
    """An annotation the mapper does not understand becomes ``{}`` (any value)."""

    class Custom:
        pass

    assert json_schema_of(Custom) == {}


def test_json_schema_of_fixed_tuple_and_mixed_union() -> None:
    """A fixed tuple uses prefixItems; a union of non-primitive options uses anyOf."""
    assert json_schema_of(tuple[int, str]) == {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "string"}],
        "items": False,
    }
    assert json_schema_of(list[int] | None) == {
        "anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]
    }


# --- schema_for: whole signatures --------------------------------------------------------------


def _everything(
    text: str,
    count: int,
    ratio: float,
    flag: bool,
    nothing: None,
    numbers: list[int],
    more: tuple[int, ...],
    weights: dict[str, float],
    mode: Literal["a", "b"],
    maybe: int | None,
    label: Optional[str],  # noqa: UP045
    anything: Any,
    limit: int = 3,
    name: str = "x",
    scale: float = 1.5,
    verbose: bool = False,
    fallback: str | None = None,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Do everything."""


def test_schema_for_a_signature_with_every_supported_type() -> None:
    """Properties follow the annotations; required = no default; unknown keys forbidden."""
    description, schema = schema_for(_everything)
    assert description == "Do everything."
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props == {
        "text": {"type": "string"},
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "nothing": {"type": "null"},
        "numbers": {"type": "array", "items": {"type": "integer"}},
        "more": {"type": "array", "items": {"type": "integer"}},
        "weights": {"type": "object", "additionalProperties": {"type": "number"}},
        "mode": {"enum": ["a", "b"]},
        "maybe": {"type": ["integer", "null"]},
        "label": {"type": ["string", "null"]},
        "anything": {},
        "limit": {"type": "integer", "default": 3},
        "name": {"type": "string", "default": "x"},
        "scale": {"type": "number", "default": 1.5},
        "verbose": {"type": "boolean", "default": False},
        "fallback": {"type": ["string", "null"], "default": None},
    }
    # *args / **kwargs are not parameters the model can fill.
    assert "args" not in props
    assert "kwargs" not in props
    assert schema["required"] == [
        "text",
        "count",
        "ratio",
        "flag",
        "nothing",
        "numbers",
        "more",
        "weights",
        "mode",
        "maybe",
        "label",
        "anything",
    ]
    jsonschema.Draft202012Validator.check_schema(schema)


def test_a_default_that_is_not_json_is_left_out_but_the_parameter_stays_optional() -> None:
    """A non-JSON default (an object) is not put in the schema; the parameter is still optional."""
    sentinel = object()

    def fn(a: int, b: Any = sentinel) -> None:
        """Doc."""

    _, schema = schema_for(fn)
    assert schema["properties"]["b"] == {}
    assert schema["required"] == ["a"]


def test_unannotated_and_unresolvable_annotations_accept_any_value() -> None:
    """Missing annotations and names that cannot be resolved both fall back to ``{}``."""

    def bare(x, y=2):  # type: ignore[no-untyped-def]
        """Doc."""

    _, schema = schema_for(bare)
    assert schema["properties"] == {"x": {}, "y": {"default": 2}}
    assert schema["required"] == ["x"]

    def unresolved(x: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
        """Doc."""

    _, schema = schema_for(unresolved)
    assert schema["properties"] == {"x": {}}


# --- docstrings -------------------------------------------------------------------------------


def _google(query: str, limit: int = 10, *, exact: bool = False) -> list[str]:
    """Search the catalogue for matching items.

    Longer explanation that is not part of
    the tool description.

    Args:
        query: The words to look for; this description
            goes on over a second line
            and a third.
        limit (int): At most this many results.
        exact: Match the words exactly.

    Returns:
        The matching item names.

    Raises:
        ToolError: when the catalogue is down.
    """
    return []


def test_google_args_section_gives_parameter_descriptions() -> None:
    """Google ``Args:`` entries become descriptions; continuation lines are joined."""
    description, schema = schema_for(_google)
    assert description == "Search the catalogue for matching items."
    props = schema["properties"]
    assert props["query"]["description"] == (
        "The words to look for; this description goes on over a second line and a third."
    )
    assert props["limit"]["description"] == "At most this many results."
    assert props["exact"]["description"] == "Match the words exactly."
    # Sections after Args (Returns, Raises) do not leak into the parameters.
    assert set(props) == {"query", "limit", "exact"}


def test_sphinx_params_give_parameter_descriptions() -> None:
    """Sphinx ``:param name:`` (optionally typed) lines become descriptions."""

    def fn(path: str, mode: int = 0) -> None:
        """Open a file for the user.

        Only files under the workspace.

        :param path: Where the file is.
        :param int mode: How to open it.
        :returns: nothing.
        """

    description, schema = schema_for(fn)
    assert description == "Open a file for the user."
    assert schema["properties"]["path"]["description"] == "Where the file is."
    assert schema["properties"]["mode"]["description"] == "How to open it."


def test_description_is_the_first_paragraph_joined_into_one_line() -> None:
    """A summary wrapped over several lines is one line; later paragraphs are dropped."""

    def fn() -> None:
        """Fetch the weather
        for a city.

        Uses a public API.
        """

    assert schema_for(fn)[0] == "Fetch the weather for a city."


def test_parse_docstring_of_nothing() -> None:
    """No docstring: no description, no parameter descriptions."""
    assert parse_docstring(None) == ("", {})
    assert parse_docstring("") == ("", {})

    def fn(a: int) -> None:
        pass

    description, schema = schema_for(fn)
    assert description == ""
    assert "description" not in schema["properties"]["a"]


def test_undocumented_parameters_have_no_description() -> None:
    """Only documented parameters get a description key."""

    def fn(a: int, b: int) -> None:
        """Add.

        Args:
            a: The first number.
        """

    _, schema = schema_for(fn)
    assert schema["properties"]["a"]["description"] == "The first number."
    assert "description" not in schema["properties"]["b"]


# --- @tool and Tool.from_function ---------------------------------------------------------------


def test_tool_decorator_without_arguments() -> None:
    """``@tool`` makes a Tool named after the function, with the derived schema."""

    @tool
    async def lookup(city: str, days: int = 1) -> dict[str, Any]:
        """Look up the forecast.

        Args:
            city: The city name.
        """
        return {"city": city, "days": days}

    assert isinstance(lookup, Tool)
    assert lookup.name == "lookup"
    assert lookup.description == "Look up the forecast."
    assert lookup.timeout is None
    assert lookup.is_async
    assert lookup.parameters["required"] == ["city"]
    assert lookup.parameters["properties"]["city"] == {
        "type": "string",
        "description": "The city name.",
    }
    assert lookup.spec.name == "lookup"
    assert lookup.spec.parameters == lookup.parameters


def test_tool_decorator_with_overrides() -> None:
    """``@tool(name=, description=, timeout=)`` overrides the derived values."""

    @tool(name="weather", description="Forecast for a city.", timeout=2.5)
    def lookup(city: str) -> str:
        """Ignored docstring summary."""
        return city

    assert lookup.name == "weather"
    assert lookup.description == "Forecast for a city."
    assert lookup.timeout == 2.5
    assert not lookup.is_async
    assert lookup.parameters["required"] == ["city"]


def test_tool_decorator_with_empty_parentheses() -> None:
    """``@tool()`` behaves like ``@tool``."""

    @tool()
    def ping() -> str:
        """Answer pong."""
        return "pong"

    assert isinstance(ping, Tool)
    assert ping.name == "ping"
    assert ping.parameters == {
        "type": "object",
        "properties": {},
        "required": [],
        "additionalProperties": False,
    }


async def test_decorated_tool_is_still_callable_like_the_function() -> None:
    """Calling the Tool calls the function (sync returns, async returns a coroutine)."""

    @tool
    def add(a: int, b: int = 1) -> int:
        """Add."""
        return a + b

    @tool
    async def twice(x: int) -> int:
        """Double."""
        return 2 * x

    assert add(2) == 3
    assert add(2, b=5) == 7
    assert await twice(21) == 42


def test_hand_written_parameters_schema_is_used_as_is() -> None:
    """``Tool.from_function(parameters=...)`` keeps the given schema verbatim and validates by it."""
    schema = {
        "type": "object",
        "properties": {"q": {"type": "string", "minLength": 3}},
        "required": ["q"],
    }

    def search(q: int, extra: int = 0) -> str:
        """Search."""
        return str(q)

    made = Tool.from_function(search, parameters=schema)
    assert made.parameters == schema
    assert made.description == "Search."
    with pytest.raises(ToolError, match=r"q: .*(minLength|too short|shorter)") as info:
        made.bind({"q": "ab"})
    assert info.value.error_type == "invalid_arguments"
    assert made.bind({"q": "abc"}).arguments == {"q": "abc"}


def test_hand_written_parameters_schema_must_be_a_valid_schema() -> None:
    """A broken hand-written schema is refused when the tool is made, not at call time."""

    def fn(x: int) -> int:
        return x

    with pytest.raises(jsonschema.SchemaError):
        Tool.from_function(fn, parameters={"type": "no-such-type"})


def test_registry_accepts_tools_and_functions_and_refuses_duplicates() -> None:
    """``ToolRegistry`` takes Tools or plain functions; a duplicate name is an error."""

    @tool(name="a")
    def first() -> int:
        """First."""
        return 1

    def second() -> int:
        """Second."""
        return 2

    registry = ToolRegistry([first, second])
    assert "a" in registry
    assert "second" in registry
    assert len(registry) == 2
    assert [s.name for s in registry.specs] == ["a", "second"]
    with pytest.raises(ValueError, match="already registered"):
        registry.add(Tool.from_function(second))

    @registry.tool(name="third", timeout=4)
    async def third_fn() -> int:
        """Third."""
        return 3

    # The registry decorator leaves the function as it was.
    assert inspect.iscoroutinefunction(third_fn)
    registered = registry.get("third")
    assert registered is not None
    assert registered.timeout == 4
    assert registered.description == "Third."


# --- ArgumentValidator ----------------------------------------------------------------------------


def _validator_target(
    name: str,
    count: int,
    mode: Literal["fast", "slow"],
    numbers: list[int],
    weights: dict[str, float],
    flag: bool = False,
) -> None:
    """Target."""


@pytest.fixture
def validator() -> ArgumentValidator:
    return ArgumentValidator(schema_for(_validator_target)[1])


_VALID = {"name": "n", "count": 2, "mode": "fast", "numbers": [1, 2], "weights": {"a": 0.5}}


def test_valid_arguments_have_no_errors(validator: ArgumentValidator) -> None:
    """Arguments matching the schema (with or without optional ones) pass."""
    assert validator.errors(_VALID) == []
    assert validator.errors({**_VALID, "flag": True}) == []
    # JSON Schema: a number with no fractional part is an integer.
    assert validator.errors({**_VALID, "count": 2.0}) == []


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"name": None}, "name", "required property"),
        ({"surprise": 1}, None, "surprise"),
        ({"count": "two"}, "count", "not of type 'integer'"),
        ({"count": True}, "count", "not of type 'integer'"),
        ({"count": 1.5}, "count", "not of type 'integer'"),
        ({"flag": 1}, "flag", "not of type 'boolean'"),
        ({"mode": "medium"}, "mode", "not one of"),
        ({"numbers": [1, "x", 3]}, "numbers.1", "not of type 'integer'"),
        ({"weights": {"a": "heavy"}}, "weights.a", "not of type 'number'"),
    ],
    ids=[
        "missing",
        "unknown",
        "string-for-int",
        "bool-for-int",
        "fraction-for-int",
        "int-for-bool",
        "enum",
        "list-item",
        "dict-value",
    ],
)
def test_invalid_arguments_give_readable_messages_naming_the_field(
    validator: ArgumentValidator, change: dict[str, Any], field: str | None, words: str
) -> None:
    """Each kind of problem yields one readable message that names the field."""
    arguments = {k: v for k, v in {**_VALID, **change}.items() if v is not None}
    errors = validator.errors(arguments)
    assert len(errors) == 1, errors
    (message,) = errors
    assert words in message
    if field is not None and "required" not in words:
        assert message.startswith(f"{field}: ")
    if field is not None:
        assert repr(field) in message or message.startswith(f"{field}: ")


def test_unknown_argument_message_names_it(validator: ArgumentValidator) -> None:
    """An unexpected argument is named in the message."""
    (message,) = validator.errors({**_VALID, "colour": "red"})
    assert "'colour'" in message
    assert "not allowed" in message


def test_every_problem_is_reported_in_path_order(validator: ArgumentValidator) -> None:
    """Several problems: one message each, top-level ones before nested ones."""
    errors = validator.errors({"name": 1, "count": 1, "mode": "x", "numbers": ["y"], "weights": {}})
    assert len(errors) == 3
    assert errors[0].startswith("mode: ")
    assert errors[1].startswith("name: ")
    assert errors[2].startswith("numbers.0: ")


def test_tool_bind_raises_invalid_arguments_with_every_problem() -> None:
    """``Tool.bind`` wraps all problems into one ToolError of type invalid_arguments."""

    @tool
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    with pytest.raises(ToolError) as info:
        add.bind({"a": "x"})
    assert info.value.error_type == "invalid_arguments"
    text = str(info.value)
    assert "'add'" in text
    assert "a: 'x' is not of type 'integer'" in text
    assert "'b' is a required property" in text
    assert add.bind({"a": 1, "b": 2}).arguments == {"a": 1, "b": 2}


# --- hypothesis: derived schemas accept matching values and refuse wrong ones --------------------

#: (annotation, values of that type, a value of the wrong type)
_KINDS: dict[str, tuple[Any, st.SearchStrategy[Any], Any]] = {
    "str": (str, st.text(max_size=10), 7),
    "int": (int, st.integers(), "seven"),
    "float": (float, st.floats(allow_nan=False, allow_infinity=False) | st.integers(), "x"),
    "bool": (bool, st.booleans(), 1),
    "list_int": (list[int], st.lists(st.integers(), max_size=4), ["x"]),
    "tuple_str": (tuple[str, ...], st.lists(st.text(max_size=3), max_size=4), [1]),
    "dict_float": (
        dict[str, float],
        st.dictionaries(st.text(max_size=3), st.floats(allow_nan=False), max_size=3),
        {"k": "v"},
    ),
    "literal": (Literal["a", "b"], st.sampled_from(["a", "b"]), "c"),
    "opt_int": (int | None, st.none() | st.integers(), "x"),
    "any": (Any, st.none() | st.integers() | st.text(max_size=3), None),
}
_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)


def _make_function(params: list[tuple[str, str, bool]]) -> Callable[..., Any]:
    """A function with the given ``(name, kind, has_default)`` parameters."""

    def fn(**kwargs: Any) -> Any:
        return kwargs

    signature_params = []
    annotations: dict[str, Any] = {}
    # Parameters with defaults after those without, as Python requires.
    for name, kind, has_default in sorted(params, key=lambda p: p[2]):
        annotation = _KINDS[kind][0]
        annotations[name] = annotation
        signature_params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=annotation,
                default=None if has_default else inspect.Parameter.empty,
            )
        )
    fn.__signature__ = inspect.Signature(signature_params)  # type: ignore[attr-defined]
    fn.__annotations__ = annotations
    fn.__doc__ = "Generated."
    return fn


@st.composite
def _signatures_and_arguments(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, str, bool]], dict[str, Any], str]:
    names = draw(st.lists(_NAMES, min_size=1, max_size=5, unique=True))
    params = [(name, draw(st.sampled_from(sorted(_KINDS))), draw(st.booleans())) for name in names]
    arguments = {}
    for name, kind, has_default in params:
        if has_default and draw(st.booleans()):
            continue  # leave an optional parameter out
        arguments[name] = draw(_KINDS[kind][1])
    typed = [name for name, kind, _ in params if kind != "any"]
    wrong = draw(st.sampled_from(typed)) if typed else ""
    return params, arguments, wrong


@given(_signatures_and_arguments())
def test_derived_schema_accepts_matching_and_refuses_wrong_arguments(
    case: tuple[list[tuple[str, str, bool]], dict[str, Any], str],
) -> None:
    """Generated signatures: matching arguments pass; one wrong-typed value is refused by name."""
    params, arguments, wrong = case
    made = Tool.from_function(_make_function(params), name="generated")
    schema = made.parameters
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["required"] == [n for n, _, d in sorted(params, key=lambda p: p[2]) if not d]
    validator = ArgumentValidator(schema)
    assert validator.errors(arguments) == []
    assert made.bind(arguments).arguments == arguments

    # A required parameter left out is refused, naming it.
    required = [n for n, _, d in params if not d]
    if required:
        missing = {k: v for k, v in arguments.items() if k != required[0]}
        assert any(repr(required[0]) in e for e in validator.errors(missing))

    # An unknown parameter is refused.
    assert validator.errors({**arguments, "zz_unknown": 1})

    if wrong:
        kind = next(k for n, k, _ in params if n == wrong)
        errors = validator.errors({**arguments, wrong: _KINDS[kind][2]})
        assert errors, (wrong, kind)
        assert all(e.startswith(f"{wrong}") for e in errors), errors
        with pytest.raises(ToolError) as info:
            made.bind({**arguments, wrong: _KINDS[kind][2]})
        assert info.value.error_type == "invalid_arguments"


# --- docstring edge cases that are lost today (bugs) ----------------------------------------------


def test_google_entry_with_nested_parentheses_in_its_type() -> None:
    """``b (Callable(int)): second`` is b's entry, not a continuation of a's."""
    _, params = parse_docstring("Do.\n\nArgs:\n    a (int): first\n    b (Callable(int)): second\n")
    assert params == {"a": "first", "b": "second"}


def test_google_continuation_line_that_looks_like_a_header() -> None:
    """An indented ``Example:`` inside an entry does not end the Args section."""
    doc = "Do.\n\nArgs:\n    a: first\n        Example:\n            a=1\n    b: second\n"
    _, params = parse_docstring(doc)
    assert params.get("b") == "second"


def test_sphinx_multi_line_param_description_is_joined() -> None:
    """A Sphinx description wrapped over two lines is joined like a Google one."""
    _, params = parse_docstring("Do.\n\n:param a: first\n    continued here\n:param b: second\n")
    assert params == {"a": "first continued here", "b": "second"}
