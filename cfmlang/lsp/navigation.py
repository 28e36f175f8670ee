"""Definition, references, rename and document symbols: where each node name occurs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lsprotocol import types

from cfmlang.diagnostics import Span
from cfmlang.frontend import ast
from cfmlang.frontend.resolve import stdlib_path
from cfmlang.lsp.analysis import Analysis
from cfmlang.lsp.positions import contains, path_to_uri, to_range

SYMBOL_KINDS = {"model": types.SymbolKind.Class, "brick": types.SymbolKind.Module,
                "merge": types.SymbolKind.Function, "route": types.SymbolKind.Interface,
                "grow": types.SymbolKind.Function, "update": types.SymbolKind.Function,
                "search": types.SymbolKind.Event}


@dataclass(frozen=True)
class Occurrence:
    name: str
    span: Span
    is_declaration: bool


def refs_in(value: ast.Value) -> list[ast.Ref]:
    if isinstance(value, ast.Ref):
        return [value]
    if isinstance(value, ast.ListValue):
        return [r for item in value.items for r in refs_in(item)]
    if isinstance(value, ast.MapValue):
        return [r for entry in value.entries for r in refs_in(entry.value)]
    if isinstance(value, ast.Call):
        return [r for arg in value.args for r in refs_in(arg)]
    return []


def statement_occurrences(statements, names: set[str]) -> list[Occurrence]:
    found = []
    for statement in statements:
        if isinstance(statement, ast.Decl):
            found.append(Occurrence(statement.name, statement.name_span, True))
            values = [statement.body]
        elif isinstance(statement, ast.Setting):
            values = [statement.value]
        else:
            values = []
        found += [Occurrence(r.name, r.name_span, False) for v in values for r in refs_in(v) if r.name in names]
    return found


def occurrences(analysis: Analysis) -> list[Occurrence]:
    """Every declaration of and reference to a node: in this file, and in the declarations
    of the files it imports."""
    declared = analysis.declarations()
    names = set(declared)
    found = statement_occurrences(analysis.program.statements if analysis.program else (), names)
    elsewhere = [d for d in declared.values() if d.span.file != analysis.path]
    return found + statement_occurrences(elsewhere, names)


def occurrence_at(analysis: Analysis, position: types.Position) -> Occurrence | None:
    return next((o for o in occurrences(analysis)
                 if o.span.file == analysis.path and contains(o.span, position)), None)


def location(span: Span) -> types.Location:
    return types.Location(uri=path_to_uri(span.file), range=to_range(span))


def definition(analysis: Analysis, position: types.Position) -> types.Location | None:
    imported = import_at(analysis, position)
    if imported is not None:
        return imported
    hit = occurrence_at(analysis, position)
    decl = analysis.declarations().get(hit.name) if hit else None
    return location(decl.name_span) if decl else None


def import_at(analysis: Analysis, position: types.Position) -> types.Location | None:
    """The file an `import "..."` under the cursor reads."""
    if analysis.program is None or analysis.resolved is None:
        return None
    for statement in analysis.program.statements:
        if isinstance(statement, ast.Import) and contains(statement.path_span, position):
            read = [Path(f) for f, _ in analysis.resolved.files if Path(f).name == Path(statement.path).name]
            if read:
                return types.Location(uri=read[0].resolve().as_uri(), range=types.Range(
                    start=types.Position(line=0, character=0), end=types.Position(line=0, character=0)))
    return None


def references(analysis: Analysis, position: types.Position, include_declaration: bool) -> list[types.Location]:
    hit = occurrence_at(analysis, position)
    if hit is None:
        return []
    return [location(o.span) for o in occurrences(analysis)
            if o.name == hit.name and (include_declaration or not o.is_declaration)]


class RenameRefused(Exception):
    pass


def rename(analysis: Analysis, position: types.Position, new_name: str) -> types.WorkspaceEdit | None:
    hit = occurrence_at(analysis, position)
    if hit is None:
        return None
    if not ast_name(new_name):
        raise RenameRefused(f"`{new_name}` is not a name (letters, digits and _, not starting with a digit)")
    if new_name in analysis.declarations():
        raise RenameRefused(f"`{new_name}` is already declared")
    if analysis.program is None or analysis.program.broken:
        raise RenameRefused("the file has syntax errors; a statement that does not parse may use the name")
    spans = [o.span for o in occurrences(analysis) if o.name == hit.name]
    std = stdlib_path("std").resolve()
    if any(Path(s.file).resolve().is_relative_to(std) for s in spans):
        raise RenameRefused(f"`{hit.name}` is declared in the standard library, which is not edited")
    changes: dict[str, list[types.TextEdit]] = {}
    for span in spans:
        changes.setdefault(path_to_uri(span.file), []).append(types.TextEdit(range=to_range(span), new_text=new_name))
    return types.WorkspaceEdit(changes=changes)


def ast_name(text: str) -> bool:
    return text.isidentifier() and text.isascii()


def document_symbols(analysis: Analysis) -> list[types.DocumentSymbol]:
    if analysis.program is None:
        return []
    return [types.DocumentSymbol(name=s.name, detail=s.keyword, kind=SYMBOL_KINDS.get(s.keyword, types.SymbolKind.Object),
                                 range=to_range(s.span), selection_range=to_range(s.name_span))
            for s in analysis.program.statements if isinstance(s, ast.Decl)]
