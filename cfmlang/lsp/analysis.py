"""One document's analysis: every stage's diagnostics, and what navigation needs.

The checker reads only headers, configs and GGUF metadata, all kept per file version
(cfmlang.io.filecache, io.sources), so re-analysing after a keystroke costs milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cfmlang.compiler.ir import CheckedProgram
from cfmlang.diagnostics import CompileError, Diagnostic
from cfmlang.frontend import ast
from cfmlang.frontend.resolve import Resolved, resolve
from cfmlang.frontend.to_ast import parse_recovering
from cfmlang.search.program import check_search


@dataclass(frozen=True)
class Analysis:
    path: str
    text: str
    diagnostics: tuple[Diagnostic, ...]
    program: ast.Program | None
    """This file's statements that parse, and those that do not (None when nothing of
    the file can be kept)."""
    resolved: Resolved | None
    """Every declaration of the file and its imports that parses (None with `program`)."""
    checked: CheckedProgram | None
    """The checked program (None when the checker found errors); for a search, the
    program with every open value at its first candidate."""

    def declarations(self) -> dict[str, ast.Decl]:
        if self.resolved is not None:
            return {name: declared.decl for name, declared in self.resolved.symbols}
        if self.program is not None:
            return {s.name: s for s in self.program.statements if isinstance(s, ast.Decl)}
        return {}

    def node(self, name: str):
        if self.checked is None:
            return None
        return next((n for n in self.checked.nodes if n.name == name), None)


def analyze(text: str, path: str) -> Analysis:
    """Syntax errors leave out only their statements: the others are checked, and the
    diagnostics of every stage come together."""
    try:
        program = parse_recovering(text, path)
    except CompileError as exc:
        return Analysis(path, text, exc.diagnostics, None, None, None)
    resolved = resolve(text, path, Path(path).parent, program)
    try:
        checked = check_search(resolved).checked
    except CompileError as exc:
        return Analysis(path, text, exc.diagnostics, program, resolved, None)
    return Analysis(path, text, checked.warnings, program, resolved, checked)
