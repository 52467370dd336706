"""Safe arithmetic for the demo calculator: an evaluator over ``ast``, never ``eval``."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
MAX_EXPRESSION_LENGTH = 200
MAX_EXPONENT = 64
#: Largest magnitude of any intermediate result, in bits (keeps every step fast).
MAX_BITS = 1024
#: Integers beyond 64 bits are returned as floats (JSON encoders take 64-bit integers).
MAX_EXACT_INT = 2**63 - 1


class CalculationError(ValueError):
    """The expression is not plain arithmetic, or cannot be computed."""


def _checked(value: float) -> float:
    if isinstance(value, complex):
        raise CalculationError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise CalculationError("result is too large")
    return value


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise CalculationError("booleans are not numbers here")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (
            abs(right) > MAX_EXPONENT or abs(right) * math.log2(abs(left) + 1) > MAX_BITS
        ):
            raise CalculationError(f"{left} ** {right} is too large")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculationError("division by zero") from None
        except OverflowError:
            raise CalculationError("result is too large") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise CalculationError(f"unsupported element {type(node).__name__!r}")


def calculate(expression: str) -> int | float:
    """Evaluate ``+ - * / // % **`` and parentheses over numbers.

    Raises:
        CalculationError: anything else (names, calls, attributes...), division
            by zero, huge exponents, or an over-long expression.
    """
    text = expression.strip().replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/")
    if not text or len(text) > MAX_EXPRESSION_LENGTH:
        raise CalculationError("expression is empty or too long")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculationError(f"not an arithmetic expression: {expression!r}") from None
    value = _eval(tree)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculationError("result is not a finite number")
        if value.is_integer() and abs(value) <= MAX_EXACT_INT:
            return int(value)
    elif abs(value) > MAX_EXACT_INT:
        return float(value)
    return value
