"""The demo calculator (netra_actors._calc): plain arithmetic over ``ast``, never ``eval``."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netra_actors._calc import (
    MAX_EXACT_INT,
    MAX_EXPONENT,
    MAX_EXPRESSION_LENGTH,
    CalculationError,
    calculate,
)

# --- accepted arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", 14),
        ("2*3+4", 10),
        ("(2+3)*4", 20),
        ("2*(3+4)", 14),
        ("((1+2))*((3))", 9),
        ("10-4-3", 3),
        ("100/10/5", 2),
        ("2**3**2", 512),
        ("(2**3)**2", 64),
        ("2^10", 1024),
        ("2^3^2", 512),
        ("-3+5", 2),
        ("-(2+3)", -5),
        ("--3", 3),
        ("+4", 4),
        ("-2**2", -4),
        ("(-2)**2", 4),
        ("7//2", 3),
        ("-7//2", -4),
        ("7%3", 1),
        ("-7%3", 2),
        ("  1 + 1  ", 2),
        ("3\u00d74", 12),
        ("8\u00f72", 4),
        ("1e3", 1000),
        ("2**62", 4611686018427387904),
        ("1_000+1", 1001),
    ],
)
def test_integer_results(expression: str, expected: int) -> None:
    """Integer-valued expressions evaluate with the usual precedence and associativity, as ``int``."""
    result = calculate(expression)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("7/2", 3.5),
        ("1/3", 1 / 3),
        ("0.1+0.2", 0.1 + 0.2),
        ("2**-1", 0.5),
        ("2^-2", 0.25),
        ("-1.5*3", -4.5),
        ("7.5//2 + 0.25", 3.25),
        ("5.5%2", 1.5),
    ],
)
def test_float_results(expression: str, expected: float) -> None:
    """Non-integral results are returned as ``float``."""
    result = calculate(expression)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("6/3", 2), ("1.5*2", 3), ("0.5+0.5", 1), ("2.0", 2), ("-4/2", -2), ("1e-400", 0)],
)
def test_integer_valued_floats_become_int(expression: str, expected: int) -> None:
    """A float result with no fractional part is returned as ``int``."""
    result = calculate(expression)
    assert result == expected
    assert type(result) is int


def test_caret_means_power() -> None:
    """``^`` is exponentiation, not XOR: ``2^3`` is 8."""
    assert calculate("2^3") == calculate("2**3") == 8


def test_exponent_limit_is_inclusive() -> None:
    """Exponents up to ``MAX_EXPONENT`` in absolute value are allowed."""
    assert calculate(f"2**{MAX_EXPONENT}") == 2**MAX_EXPONENT
    assert calculate(f"2**-{MAX_EXPONENT}") == 2.0**-MAX_EXPONENT


def test_longest_expression_is_accepted() -> None:
    """An expression of exactly ``MAX_EXPRESSION_LENGTH`` characters is evaluated."""
    expression = "1" * MAX_EXPRESSION_LENGTH
    assert calculate(expression) == float(expression)


def test_calculation_error_is_a_value_error() -> None:
    """``CalculationError`` is a ``ValueError`` (the calculator tool catches ``ValueError``)."""
    assert issubclass(CalculationError, ValueError)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        # names, calls, attributes, other syntax
        "x",
        "x+1",
        "pi",
        "abs(-1)",
        "__import__('os')",
        "__import__('os').system('true')",
        "(1).real",
        "(1).__class__",
        "lambda: 1",
        "(lambda: 1)()",
        "[1, 2]",
        "(1, 2)",
        "{1: 2}",
        "1 if 1 else 2",
        "1 < 2",
        "1 and 2",
        "not 1",
        "~1",
        "1 & 2",
        "1 | 2",
        "1 << 2",
        "'a'",
        "'a' * 3",
        "b'a'",
        "1j",
        "1+2j",
        "None",
        "...",
        "True",
        "False + 1",
        "x := 1",
        "a = 1",
        "1; 2",
        "import os",
        "f'{1}'",
        "2 +",
        "()",
        "1\x00",
        # huge exponents
        f"2**{MAX_EXPONENT + 1}",
        f"2**-{MAX_EXPONENT + 1}",
        "9**9**9",
        "2^100",
        "2**(10*10)",
        # division by zero
        "1/0",
        "1//0",
        "1%0",
        "1/0.0",
        "1/(2-2)",
        "0**-1",
        # not finite, or too large for a float
        "1e999",
        "1e308*10",
        "-1e308*10",
        "1e308**2",
        "1e999-1e999",
        "(9**64)**64/1",
        "(9**64)**64+0.5",
        # empty or too long
        "",
        "   ",
        "\n\t",
        "1" * (MAX_EXPRESSION_LENGTH + 1),
        "+".join(["1"] * 120),
    ],
)
def test_refusals(expression: str) -> None:
    """Anything but finite plain arithmetic within the limits raises ``CalculationError``."""
    with pytest.raises(CalculationError):
        calculate(expression)


def test_length_limit_counts_the_stripped_text() -> None:
    """Surrounding whitespace does not count towards ``MAX_EXPRESSION_LENGTH``."""
    assert calculate("  " + "1" * MAX_EXPRESSION_LENGTH + "  ") == float(
        "1" * MAX_EXPRESSION_LENGTH
    )


@pytest.mark.parametrize("expression", ["(-8)**0.5", "(-1)^(1/3)"])
def test_results_are_never_complex(expression: str) -> None:
    """A power that has no real result is refused instead of returning a ``complex``."""
    with pytest.raises(CalculationError):
        calculate(expression)


def test_nested_powers_cannot_build_huge_numbers() -> None:
    """Chained powers within the exponent limit are still refused once the result is huge."""
    # 9**(64**3): about 830,000 bits, computed quickly; one more level takes seconds and 6 MB+.
    with pytest.raises(CalculationError):
        calculate("((9**64)**64)**64")


# --- properties -------------------------------------------------------------------------------

Tree = tuple[ast.expr, Any]  # an expression node and its value (or an exception type)

_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _leaf(n: int) -> Tree:
    return ast.Constant(n), n


def _apply(op: type[ast.operator], left: Tree, right: Tree) -> Tree:
    node = ast.BinOp(left[0], op(), right[0])
    if isinstance(left[1], type) or isinstance(right[1], type):
        return node, left[1] if isinstance(left[1], type) else right[1]
    try:
        return node, _OPS[op](left[1], right[1])
    except (ZeroDivisionError, OverflowError) as exc:
        return node, type(exc)


def _power(base: Tree, exponent: int) -> Tree:
    node = ast.BinOp(base[0], ast.Pow(), ast.Constant(exponent))
    if isinstance(base[1], type):
        return node, base[1]
    try:
        return node, base[1] ** exponent
    except (ZeroDivisionError, OverflowError) as exc:
        return node, type(exc)


def _negate(operand: Tree) -> Tree:
    node = ast.UnaryOp(ast.USub(), operand[0])
    return node, operand[1] if isinstance(operand[1], type) else -operand[1]


def _extend(children: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    return st.one_of(
        st.builds(_apply, st.sampled_from(sorted(_OPS, key=str)), children, children),
        st.builds(_power, children, st.integers(min_value=0, max_value=3)),
        st.builds(_negate, children),
    )


#: Small integer arithmetic trees, each with the value Python's own operators give it.
arithmetic = st.recursive(st.integers(min_value=0, max_value=20).map(_leaf), _extend, max_leaves=8)


def _expected(value: Any, text: str) -> Any:
    """What ``calculate`` should give for a tree of this value: a number or ``CalculationError``."""
    if isinstance(value, type) or len(text) > MAX_EXPRESSION_LENGTH:
        return CalculationError
    if isinstance(value, float):
        if not math.isfinite(value):
            return CalculationError
        if value.is_integer() and abs(value) <= MAX_EXACT_INT:
            return int(value)
    elif abs(value) > MAX_EXACT_INT:
        return float(value)  # beyond 64 bits (see test_integers_beyond_64_bits_become_floats)
    return value


def _calculate(text: str) -> Any:
    try:
        return calculate(text)
    except CalculationError:
        return CalculationError


@given(arithmetic)
def test_matches_python_arithmetic(tree: Tree) -> None:
    """For generated integer arithmetic, ``calculate`` of its text equals Python's value of the tree."""
    node, value = tree
    text = ast.unparse(ast.fix_missing_locations(ast.Expression(node)))
    expected = _expected(value, text)
    result = _calculate(text)
    assert result == expected
    assert type(result) is type(expected)
    # Cross-check the tree against Python's own evaluation of the same digit/operator string.
    if expected is not CalculationError and len(text) <= MAX_EXPRESSION_LENGTH:
        assert eval(text, {"__builtins__": {}}) == value


@given(arithmetic)
def test_caret_and_double_star_agree(tree: Tree) -> None:
    """Writing every power with ``^`` instead of ``**`` gives the same result."""
    text = ast.unparse(ast.fix_missing_locations(ast.Expression(tree[0])))
    assert _calculate(text.replace("**", "^")) == _calculate(text)


@given(st.text(alphabet="0123456789+-*/%^().e ", max_size=24) | st.text(max_size=24))
def test_arbitrary_text_raises_only_calculation_errors(text: str) -> None:
    """Any text either evaluates to a number or raises ``CalculationError``, never another error."""
    result = _calculate(text)
    assert result is CalculationError or isinstance(result, int | float | complex)


@pytest.mark.parametrize("expression", ["2**64", "99999999999999999999*10", "-(2**63)-1"])
def test_integers_beyond_64_bits_become_floats(expression: str) -> None:
    """Integers JSON encoders cannot carry exactly (beyond 64 bits) are returned as floats."""
    result = calculate(expression)
    assert isinstance(result, float)
    assert result == float(eval(expression))  # our own literal, not untrusted input
