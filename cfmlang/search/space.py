"""The search space: every `search(lo, hi[, log])` and `one_of(a, b, ...)` value of a
program, checked and named by where it sits (`blend.inputs.math.weight`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from cfmlang.diagnostics import Diagnostic, Span, did_you_mean, error
from cfmlang.frontend import ast
from cfmlang.frontend.format import ast_inline

FUNCTIONS = ("search", "one_of")
CHOICE_VALUES = (ast.Number, ast.String, ast.Bool, ast.Null, ast.Ref)
"""What a `one_of` may choose between: numbers, strings, booleans, null and plain names."""
SIGNIFICANT_DIGITS = 4
"""A sampled float is written into the program with this many significant digits."""


@dataclass(frozen=True)
class Dimension:
    """One open value. `kind` is `float`, `int` or `choice`; a range has `low`, `high` and
    `log`; a choice has its `choices` (AST values) and their texts as written."""

    name: str
    span: Span
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[ast.Value, ...] = ()
    texts: tuple[str, ...] = ()

    def candidates(self) -> tuple[ast.Value, ...]:
        """The values every check tries: both ends of a range, every choice."""
        if self.kind == "choice":
            return tuple(_moved(choice, self.span) for choice in self.choices)
        return (self.literal(self.low), self.literal(self.high))

    def literal(self, value) -> ast.Value:
        """The AST value written in place of the call for the concrete `value` (a number,
        or a choice's text)."""
        if self.kind == "choice":
            return _moved(self.choices[self.texts.index(value)], self.span)
        return ast.Number(self.concrete(value), self.span)

    def concrete(self, value):
        """A sampled value as the program holds it: a choice's text, an integer, or a
        float cut to SIGNIFICANT_DIGITS and kept inside the range."""
        if self.kind == "choice":
            return value
        if self.kind == "int":
            return int(value)
        rounded = float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")
        return min(max(rounded, self.low), self.high)

    def text(self, value) -> str:
        """The source text of a concrete value."""
        if self.kind == "choice":
            return value
        return repr(self.concrete(value)) if self.kind == "float" else str(int(value))

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {', '.join(self.texts)}"
        scale = ", log scale" if self.log else ""
        return f"{self.kind} in [{_number(self.low)}, {_number(self.high)}]{scale}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _moved(value: ast.Value, span: Span) -> ast.Value:
    """A choice placed where its call is (errors about the value point at the call)."""
    if isinstance(value, ast.Ref):
        return ast.Ref(value.name, value.accessors, span, span)
    if isinstance(value, ast.Null):
        return ast.Null(span)
    return type(value)(value.value, span)


def dimensions_of(name: str, body: ast.Value, problems: list[Diagnostic]) -> list[tuple[Dimension, ast.Call]]:
    """The open values of one declaration's body, in source order, named by their path
    under `name`; malformed calls are reported (E261) and left out."""
    found: list[tuple[Dimension, ast.Call]] = []
    for path, call in calls_in(body, name):
        dimension = dimension_of(path, call, problems)
        if dimension is not None:
            found.append((dimension, call))
    return found


def calls_in(value: ast.Value, path: str) -> list[tuple[str, ast.Call]]:
    """Every call in a value with its path (`a.inputs.b.weight`, `a.weight[1]`); the calls
    inside a call's arguments are the caller's to report."""
    if isinstance(value, ast.Call):
        return [(path, value)]
    if isinstance(value, ast.MapValue):
        return [found for entry in value.entries for found in calls_in(entry.value, f"{path}.{entry.key}")]
    if isinstance(value, ast.ListValue):
        return [found for index, item in enumerate(value.items) for found in calls_in(item, f"{path}[{index}]")]
    return []


def dimension_of(path: str, call: ast.Call, problems: list[Diagnostic]) -> Dimension | None:
    if call.name not in FUNCTIONS:
        problems.append(error("E261", f"unknown function `{call.name}`", call.name_span,
                              did_you_mean(call.name, FUNCTIONS) or
                              "a value is left open with `search(lo, hi)` or `one_of(a, b, ...)`"))
        return None
    nested = next((a for a in call.args if isinstance(a, ast.Call)), None)
    if nested is not None:
        problems.append(error("E261", f"`{nested.name}(...)` inside `{call.name}(...)`", nested.span,
                              "the arguments of a search value are written out: numbers, or the choices"))
        return None
    return (_range if call.name == "search" else _choice)(path, call, problems)


RANGE_HELP = "write `search(LOW, HIGH)` with LOW below HIGH, or `search(LOW, HIGH, log)` for a log scale"


def _range(path: str, call: ast.Call, problems: list[Diagnostic]) -> Dimension | None:
    args = call.args
    if len(args) not in (2, 3) or not all(isinstance(a, ast.Number) for a in args[:2]):
        problems.append(error("E261", f"`search` takes two numbers and an optional `log`, not "
                              f"{', '.join(ast.describe(a) for a in args) or 'nothing'}", call.span, RANGE_HELP))
        return None
    log = len(args) == 3
    if log and not (isinstance(args[2], ast.Ref) and args[2].is_plain and args[2].name == "log"):
        problems.append(error("E261", "the third argument of `search` can only be `log`",
                              getattr(args[2], "span", call.span), RANGE_HELP))
        return None
    low, high = args[0].value, args[1].value
    kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    if not low < high:
        problems.append(error("E261", f"the range of `search` is empty: {_number(low)} is not below {_number(high)}",
                              call.span, RANGE_HELP))
        return None
    if log and low <= 0:
        problems.append(error("E261", f"a log-scale range must be above 0, and starts at {_number(low)}",
                              call.span, "give a positive lower end, or leave out `log`"))
        return None
    if not (math.isfinite(low) and math.isfinite(high)):
        problems.append(error("E261", "the range of `search` must be finite", call.span, RANGE_HELP))
        return None
    return Dimension(path, call.span, kind, float(low) if kind == "float" else low,
                     float(high) if kind == "float" else high, log)


def _choice(path: str, call: ast.Call, problems: list[Diagnostic]) -> Dimension | None:
    args = call.args
    odd = next((a for a in args if not isinstance(a, CHOICE_VALUES) or
                isinstance(a, ast.Ref) and not a.is_plain), None)
    if odd is not None:
        problems.append(error("E261", f"`one_of` chooses between numbers, strings, booleans and names, "
                              f"not {ast.describe(odd)}", odd.span, "e.g. `one_of(ties, dare_ties)` or `one_of(2, 4, 8)`"))
        return None
    if len(args) < 2:
        problems.append(error("E261", f"`one_of` needs at least two choices, and has {len(args)}", call.span,
                              "e.g. `one_of(ties, dare_ties)`; a single value is written as it is"))
        return None
    texts = tuple(ast_inline(a) for a in args)
    repeated = next((a for i, a in enumerate(args) if texts[i] in texts[:i]), None)
    if repeated is not None:
        problems.append(error("E261", f"`{ast_inline(repeated)}` is given twice in `one_of`", repeated.span,
                              "give each choice once"))
        return None
    return Dimension(path, call.span, "choice", choices=args, texts=texts)

