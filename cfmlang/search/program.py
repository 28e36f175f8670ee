"""The search stage, between resolve and check.

`open_search` finds a program's open values (`search(...)`, `one_of(...)`) and its `search`
statement; `concrete` gives every open value a concrete one and drops the statement, so
the checker sees an ordinary program; `check_search` checks the program with every value
at each end of its range (each choice), one value moved at a time from the first
variant, and checks that every open value lies in the target's subgraph.
`without_search` is what `compile`, `plan` and `graph` see: an ordinary program, or E264.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from cfmlang.compiler.check import check as check_stage
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.diagnostics import CompileError, Diagnostic, Span, error, raise_if_errors
from cfmlang.frontend import ast
from cfmlang.frontend.format import ast_inline
from cfmlang.frontend.resolve import Resolved
from cfmlang.search.space import Dimension, calls_in, dimensions_of
from cfmlang.search.statement import SearchSpec, check_statement

KEYWORD = "search"
SEARCH_HINT = "run it with `cfmc search FILE -o DIR`; `cfmc compile` builds programs whose values are all given"


@dataclass(frozen=True)
class SearchProgram:
    """A resolved program and what it leaves open: the search statement (None when it has
    none) and the open values, in source order."""

    resolved: Resolved
    search: SearchSpec | None
    dimensions: tuple[Dimension, ...]
    problems: tuple[Diagnostic, ...]
    statements: tuple[ast.Decl, ...] = ()
    malformed: tuple[Span, ...] = ()
    """Calls reported as malformed (the checker's view of them is not reported again)."""
    checked: CheckedProgram | None = None
    """The program checked with every open value at its first candidate (`check_search`)."""

    @property
    def is_search(self) -> bool:
        return bool(self.dimensions or self.statements)

    def base_assignment(self) -> dict[Span, ast.Value]:
        return {d.span: d.candidates()[0] for d in self.dimensions}


def open_search(resolved: Resolved) -> SearchProgram:
    problems: list[Diagnostic] = []
    statements = [d.decl for _, d in resolved.symbols if d.decl.keyword == KEYWORD]
    nodes = {name for name, d in resolved.symbols if d.decl.keyword != KEYWORD}
    for extra in statements[1:]:
        problems.append(error("E263", f"a second search statement, `search {extra.name}`", extra.name_span,
                              f"a file holds one search; the first is `search {statements[0].name}` "
                              f"(line {statements[0].span.line})"))
    dimensions = []
    for name, declared in resolved.symbols:
        if declared.decl.keyword == KEYWORD:
            problems += [misplaced(call, "the search statement itself", "its values are given")
                         for _, call in calls_in(declared.decl.body, name)]
        elif declared.decl.span.file != resolved.root:
            problems += [misplaced(call, "an imported file", "move the declaration into the searched file")
                         for _, call in calls_in(declared.decl.body, name)]
        else:
            dimensions += [d for d, _ in dimensions_of(name, declared.decl.body, problems)]
    for setting in resolved.settings:
        problems += [misplaced(call, f"the file-level setting `{setting.key}`",
                               "give the node its own value (`seed:` of a node) and search that")
                     for _, call in calls_in(setting.value, setting.key)]
    search = None
    if statements:
        declared = resolved.table()[statements[0].name]
        search = check_statement(statements[0], declared.base_dir, nodes, problems)
        if not dimensions and not problems:
            problems.append(error("E263", f"`search {statements[0].name}` has nothing to search", statements[0].name_span,
                                  "leave values open in the target's declarations: `weight: search(0.0, 1.0)`, "
                                  "`method: one_of(ties, dare_ties)`"))
    elif dimensions:
        problems += [error("E260", f"`{d.name}` is left open (`{d.describe()}`), but the file has no search statement",
                           d.span, "add `search NAME:` with `target:` (a node that reads this value) and "
                           "`objective:`, and run `cfmc search FILE -o DIR`; or write a value") for d in dimensions]
    spans = {call.span for name, d in resolved.symbols for _, call in calls_in(d.decl.body, name)} | \
        {call.span for s in resolved.settings for _, call in calls_in(s.value, s.key)}
    malformed = tuple(spans - {d.span for d in dimensions})
    return SearchProgram(resolved, search, tuple(dimensions), tuple(problems), tuple(statements), malformed)


def misplaced(call: ast.Call, where: str, hint: str) -> Diagnostic:
    return error("E260", f"`{call.name}(...)` in {where}", call.span,
                 f"open values belong to declarations of the target's subgraph in the searched file; {hint}")


def concrete(resolved: Resolved, assignment: dict[Span, ast.Value]) -> Resolved:
    """The program with each call at span S replaced by `assignment[S]` and the search
    statements dropped."""
    symbols = tuple((name, replace(d, decl=replace(d.decl, body=substituted(d.decl.body, assignment))))
                    for name, d in resolved.symbols if d.decl.keyword != KEYWORD)
    return replace(resolved, symbols=symbols)


def substituted(value: ast.Value, assignment: dict[Span, ast.Value]) -> ast.Value:
    if isinstance(value, ast.Call):
        return assignment.get(value.span, ast.Null(value.span))
    if isinstance(value, ast.MapValue):
        return replace(value, entries=tuple(replace(e, value=substituted(e.value, assignment))
                                            for e in value.entries))
    if isinstance(value, ast.ListValue):
        return replace(value, items=tuple(substituted(item, assignment) for item in value.items))
    return value


def without_search(resolved: Resolved) -> Resolved:
    """The program unchanged when it leaves nothing open and has no search statement;
    otherwise E264 (with the search stage's own problems)."""
    opened = open_search(resolved)
    if not opened.is_search:
        return resolved
    first = min([d.span for d in opened.dimensions] + [s.span for s in opened.statements],
                key=lambda s: (s.line, s.col))
    what = (f"`search {opened.statements[0].name}`" if opened.statements else
            f"{len(opened.dimensions)} open value(s)")
    problems = [d for d in opened.problems if d.code != "E260" or opened.statements]
    hint = SEARCH_HINT if opened.statements else "add a `search NAME:` statement (`target:`, `objective:`) and " + SEARCH_HINT
    raise CompileError(problems + [error("E264", f"this program describes a search ({what}), not a model",
                                         first, hint)])


def check_search(resolved: Resolved) -> SearchProgram:
    """The program checked: as it is when it leaves nothing open; else the search statement,
    the open values, and the program with each value at each of its candidates. Raises
    CompileError with every problem."""
    opened = open_search(resolved)
    if not opened.is_search:
        return replace(opened, checked=check_stage(resolved))
    problems = list(opened.problems)
    base = opened.base_assignment()
    found: list[Diagnostic] = []
    checked = _variant(resolved, base, None, found)
    for dimension in opened.dimensions:
        for candidate in dimension.candidates()[1:]:
            _variant(resolved, {**base, dimension.span: candidate}, (dimension, candidate), found)
    problems += [d for d in found if d.span not in opened.malformed]
    if checked is not None and opened.search is not None:
        problems += outside_target(checked, opened)
    raise_if_errors(problems)
    return replace(opened, checked=checked)


def _variant(resolved: Resolved, assignment: dict, moved: tuple[Dimension, ast.Value] | None,
             problems: list[Diagnostic]) -> CheckedProgram | None:
    try:
        return check_stage(concrete(resolved, assignment))
    except CompileError as exc:
        for diagnostic in exc.diagnostics:
            if moved is not None:
                dimension, value = moved
                diagnostic = replace(diagnostic, notes=diagnostic.notes + (
                    f"with `{dimension.name}` = {ast_inline(value)} (line {dimension.span.line}), "
                    "one of the values it is searched over",))
            if not any(_same(diagnostic, seen) for seen in problems):
                problems.append(diagnostic)
        return None


def _same(a: Diagnostic, b: Diagnostic) -> bool:
    return (a.code, a.message, a.span) == (b.code, b.message, b.span)


def outside_target(checked: CheckedProgram, opened: SearchProgram) -> list[Diagnostic]:
    """E260 for each open value in a declaration the search's target does not read."""
    reached, todo = set(), [opened.search.target]
    while todo:
        name = todo.pop()
        if name in reached or name not in {n.name for n in checked.nodes}:
            continue
        reached.add(name)
        todo += list(checked.node(name).deps)
    return [error("E260", f"`{d.name}` is left open, but `{owner(d)}` is not built by the search's target "
                  f"`{opened.search.target}`", d.span,
                  f"open values belong to `{opened.search.target}` and the nodes it reads; "
                  f"write a value here, or search a target that reads `{owner(d)}`")
            for d in opened.dimensions if owner(d) not in reached]


def owner(dimension: Dimension) -> str:
    return dimension.name.split(".")[0].split("[")[0]
