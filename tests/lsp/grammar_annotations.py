"""Test annotations for the VS Code grammar (editors/vscode/test/*.brick), derived from
cfmlang's own parser: each token's scope follows from the AST node whose span covers it,
so the TextMate grammar is checked against the real language on every example.

    python tests/lsp/grammar_annotations.py     # rewrites editors/vscode/test/ from examples/
"""
from __future__ import annotations

import sys
from pathlib import Path

from cfmlang.diagnostics import Span
from cfmlang.frontend import ast
from cfmlang.frontend.to_ast import parse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TESTS = ROOT / "editors" / "vscode" / "test"
HEADER = '# SYNTAX TEST "source.brick" "{name}: scopes from the cfmlang parser"\n'


def value_scopes(value: ast.Value, line_text) -> list[tuple[Span, str]]:
    if isinstance(value, ast.String):
        return [(value.span, "string.quoted.double.brick")]
    if isinstance(value, ast.Number):
        return [(value.span, "constant.numeric.brick")]
    if isinstance(value, (ast.Bool, ast.Null)):
        return [(value.span, "constant.language.brick")]
    if isinstance(value, ast.Ref):
        return [(value.name_span, "variable.other.ref.brick")]
    if isinstance(value, ast.Tagged):
        quote = line_text(value.span.line).index('"', value.tag_span.end_col - 1) + 1
        string = Span(value.span.file, value.span.line, quote, value.span.end_line, value.span.end_col)
        return [(value.tag_span, "support.function.source-tag.brick"), (string, "string.quoted.double.brick")]
    if isinstance(value, ast.ListValue):
        return [s for item in value.items for s in value_scopes(item, line_text)]
    if isinstance(value, ast.Call):
        return [(value.name_span, "support.function.call.brick"),
                *(s for arg in value.args for s in value_scopes(arg, line_text))]
    if isinstance(value, ast.MapValue):
        return [s for e in value.entries
                for s in [(e.key_span, "variable.other.key.brick"), *value_scopes(e.value, line_text)]]
    return []


def statement_scopes(statement: ast.Statement, line_text) -> list[tuple[Span, str]]:
    if isinstance(statement, ast.Import):
        return [(statement.keyword_span, "keyword.control.import.brick"),
                (statement.path_span, "string.quoted.double.brick")]
    if isinstance(statement, ast.Setting):
        return [(statement.key_span, "variable.other.key.brick"), *value_scopes(statement.value, line_text)]
    return [(statement.keyword_span, "storage.type.brick"), (statement.name_span, "entity.name.type.brick"),
            *value_scopes(statement.body, line_text)]


def assertion(span: Span, scope: str) -> str:
    width = span.end_col - span.col
    if span.col == 1:
        return "# <" + "-" * width + " " + scope
    return "#" + " " * (span.col - 2) + "^" * width + " " + scope


def annotate(text: str, name: str) -> str:
    lines = text.splitlines()
    program = parse(text, name)
    scopes = [s for st in program.statements for s in statement_scopes(st, lambda n: lines[n - 1])]
    by_line: dict[int, list[str]] = {}
    for span, scope in scopes:
        if span.line == span.end_line:          # one-line tokens (a multi-line value has none)
            by_line.setdefault(span.line, []).append(assertion(span, scope))
    out = [HEADER.format(name=name).rstrip("\n")]
    for number, line in enumerate(lines, start=1):
        out.append(line)
        out += sorted(set(by_line.get(number, ())), key=lambda a: (a.find("^") if "^" in a else 0, a))
    return "\n".join(out) + "\n"


def expected_files() -> dict[str, str]:
    return {path.name: annotate(path.read_text(), path.name) for path in sorted(EXAMPLES.glob("*.brick"))}


if __name__ == "__main__":
    TESTS.mkdir(parents=True, exist_ok=True)
    for name, text in expected_files().items():
        (TESTS / name).write_text(text)
    sys.exit(0)
