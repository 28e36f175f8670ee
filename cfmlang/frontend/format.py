"""The canonical layout of a .brick file: `cfmc fmt`, the language server's formatting,
and `cfmc import` print through `format_source`.

The layout (docs/language.md, "Layout"):
- two spaces per block level; `key: value` with one space after the colon; `- item`;
- an inline list or map that fits on one source line is printed on one line as
  `[a, b]` / `{k: v}`; one that spans lines is printed one element per line, each
  followed by a comma, its closing bracket on a line of its own;
- numbers, strings and keys are printed as written (their meaning is their text);
  selectors without spaces (`a.layers[0:12]`);
- comments are kept: a comment on a line of its own stays before the line that follows
  it (indented like that line, or like the block it ends); a comment after code stays on
  that code's line, two spaces after it;
- blank lines are kept but runs collapse to one, and none begins the file, a block or a
  bracket, or ends one; the file ends with one newline.

The printer walks the lark tree (not the AST) so that numbers and strings keep their
written text; comments and blank lines are read from the source lines, which the
grammar's lexer discards. `print_program` prints a program built as an AST (by `cfmc
import`) in the same layout.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

from lark import Tree

from cfmlang.diagnostics import Span
from cfmlang.frontend import ast
from cfmlang.frontend.parser import normalise, parse_tree
from cfmlang.frontend.to_ast import to_ast

INDENT = 2
"""Spaces per block level."""

TRAILING_GAP = "  "
"""What separates code from a comment after it on the same line."""


@dataclass(frozen=True)
class CodeLine:
    """One printed line of code, and the source line it comes from."""

    indent: int
    text: str
    source_line: int


@dataclass(frozen=True)
class Comment:
    line: int
    column: int     # 0-based column of the `#`
    text: str
    own_line: bool  # nothing but blanks before it on its line


def format_source(text: str, file: str = "<input>") -> str:
    """The canonical layout of `text`; raises CompileError on syntax errors (the same
    diagnostics `cfmc check` gives)."""
    text = normalise(text)
    tree = parse_tree(text, file)
    to_ast(tree, file)  # the literal checks of the parser stage (string escapes, number range)
    code = _Printer().program(tree)
    source_lines = text.split("\n")
    comments = _comments(source_lines)
    blanks = {number for number, line in enumerate(source_lines, start=1) if not line.strip()}
    return _interleave(code, comments, blanks)


# ---------------------------------------------------------------- code

class _Printer:
    def __init__(self):
        self.lines: list[CodeLine] = []

    def emit(self, indent: int, text: str, source_line: int) -> None:
        self.lines.append(CodeLine(indent, text, source_line))

    def program(self, tree: Tree) -> list[CodeLine]:
        for statement in tree.children:
            if isinstance(statement, Tree):
                self.statement(statement)
        return self.lines

    def statement(self, node: Tree) -> None:
        line = node.meta.line
        if node.data == "decl":
            keyword, name, body = node.children
            self.body(f"{keyword} {name}", body, 0, line)
        elif node.data == "setting":
            key, body = node.children
            self.body(str(key), body, 0, line)
        else:
            keyword, path = node.children
            self.emit(0, f"{keyword} {path}", line)

    def body(self, head: str, body: Tree, indent: int, line: int) -> None:
        if body.data == "inline_body":
            self.value(f"{head}: ", body.children[0], "", indent, line)
            return
        self.emit(indent, f"{head}:", line)
        block = body.children[0]
        for child in block.children:
            if block.data == "map_block":
                key, entry_body = child.children
                self.body(str(key), entry_body, indent + INDENT, child.meta.line)
            else:
                self.value("- ", child.children[0], "", indent + INDENT, child.meta.line)

    def value(self, prefix: str, node: Tree, suffix: str, indent: int, line: int) -> None:
        """Print `prefix value suffix` from `line`: on one line, or a bracket that spans
        several source lines one element per line."""
        if node.data not in ("list", "map") or node.meta.line == node.meta.end_line:
            self.emit(indent, prefix + inline(node) + suffix, line)
            return
        opening, closing = ("[", "]") if node.data == "list" else ("{", "}")
        self.emit(indent, prefix + opening, line)
        for element in (c for c in node.children if c is not None):
            if node.data == "list":
                self.value("", element, ",", indent + INDENT, element.meta.line)
            else:
                key, value = element.children
                self.value(f"{key}: ", value, ",", indent + INDENT, element.meta.line)
        self.emit(indent, closing + suffix, node.meta.end_line)


def inline(node: Tree) -> str:
    """A value on one line."""
    kind = node.data
    if kind in ("number", "string"):
        return str(node.children[0])
    if kind == "tagged":
        tag, path = node.children
        return f"{tag} {path}"
    if kind == "list":
        return "[" + ", ".join(inline(c) for c in node.children if c is not None) + "]"
    if kind == "map":
        pairs = (c for c in node.children if c is not None)
        return "{" + ", ".join(f"{p.children[0]}: {inline(p.children[1])}" for p in pairs) + "}"
    if kind == "call":
        name, *args = node.children
        return f"{name}(" + ", ".join(inline(a) for a in args if a is not None) + ")"
    name, *accessors = node.children
    return str(name) + "".join(_accessor(a) for a in accessors)


def _accessor(node: Tree) -> str:
    if node.data == "attr":
        return f".{node.children[0]}"
    if node.data == "all_index":
        return "[*]"
    if node.data == "one_index":
        return f"[{int(node.children[0])}]"
    start, stop = ("" if c is None else str(int(c)) for c in node.children)
    return f"[{start}:{stop}]"


# ---------------------------------------------------------------- comments and blank lines

def _comments(lines: list[str]) -> list[Comment]:
    """Every comment of the source: a `#` outside a string (strings never span lines)."""
    found = []
    for number, line in enumerate(lines, start=1):
        column = _comment_column(line)
        if column is not None:
            found.append(Comment(number, column, line[column:].rstrip(), not line[:column].strip()))
    return found


def _comment_column(line: str) -> int | None:
    in_string = escaped = False
    for column, char in enumerate(line):
        if in_string:
            in_string = escaped or char != '"'
            escaped = char == "\\" and not escaped
        elif char == '"':
            in_string = True
        elif char == "#":
            return column
    return None


def _interleave(code: list[CodeLine], comments: list[Comment], blanks: set[int]) -> str:
    """The printed code with the source's comments and (collapsed) blank lines put back
    between its lines by source line number."""
    last_on_line = {c.source_line: i for i, c in enumerate(code)}
    trailing = {c.line: c.text for c in comments if not c.own_line and c.line in last_on_line}
    gaps = sorted([(c.line, c) for c in comments if c.line not in trailing] +
                  [(number, None) for number in blanks], key=lambda g: g[0])
    out: list[str] = []
    state = {"blank": False, "opens": True}   # a blank line is pending; the last line opens a block

    def put(indent: int, text: str, opens: bool) -> None:
        closes = text[:1] in ("]", "}")
        if state["blank"] and not state["opens"] and not closes:
            out.append("")
        out.append(" " * indent + text)
        state.update(blank=False, opens=opens)

    gap = 0
    for index, line in enumerate(code):
        while gap < len(gaps) and gaps[gap][0] < line.source_line:
            _put_gap(gaps[gap][1], put, state, line.indent, code[index - 1].indent if index else 0)
            gap += 1
        text = line.text
        if last_on_line[line.source_line] == index and line.source_line in trailing:
            text += TRAILING_GAP + trailing[line.source_line]
        put(line.indent, text, opens=line.text.endswith((":", "[", "{")))
    for _, comment in gaps[gap:]:
        _put_gap(comment, put, state, 0, code[-1].indent if code else 0)
    return "\n".join(out) + "\n" if out else ""


def _put_gap(comment: Comment | None, put, state: dict, next_indent: int, previous_indent: int) -> None:
    if comment is None:
        state["blank"] = True
        return
    indent = next_indent if comment.column <= next_indent else min(comment.column, previous_indent)
    indent = max(indent, next_indent)
    put(indent, comment.text, opens=False)


# ---------------------------------------------------------------- programs built as an AST

NOWHERE = Span("<generated>", 1, 1, 1, 1)
"""The span of AST nodes that a tool builds rather than parses."""


def generated_ref(name: str) -> ast.Ref:
    """A bare reference to the node `name`, built rather than parsed."""
    return ast.Ref(name, (), NOWHERE, NOWHERE)


def generated_entry(key: str, value: ast.Value) -> ast.Entry:
    """The body line `key: value`, built rather than parsed."""
    return ast.Entry(key, NOWHERE, value)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def print_program(statements: Sequence[ast.Statement], comments: Sequence[str] = ()) -> str:
    """The text of a program built as an AST, in the canonical layout (`format_source`
    leaves it unchanged): `comments` as the leading comment lines, then one statement
    after the other. A declaration's map body is a block; in it, a map of maps is a
    nested block of one inline map per line, a list holding maps or selections is a `- item` block, and
    every other value is written inline."""
    printer = _Printer()
    for number, text in enumerate(comments):
        printer.emit(0, "# " + text if text else "#", number)
    for statement in statements:
        if isinstance(statement, ast.Import):
            printer.emit(0, f"import {_string(statement.path)}", 0)
        elif isinstance(statement, ast.Setting):
            printer.emit(0, f"{_key(statement.key)}: {ast_inline(statement.value)}", 0)
        elif isinstance(statement.body, ast.MapValue) and statement.body.entries:
            printer.emit(0, f"{statement.keyword} {statement.name}:", 0)
            _block_entries(printer, statement.body, INDENT)
        else:
            printer.emit(0, f"{statement.keyword} {statement.name}: {ast_inline(statement.body)}", 0)
    return "\n".join(" " * line.indent + line.text for line in printer.lines) + "\n"


def _block_entries(printer: _Printer, body: ast.MapValue, indent: int) -> None:
    for entry in body.entries:
        value, head = entry.value, _key(entry.key)
        if isinstance(value, ast.MapValue) and value.entries and \
                all(isinstance(e.value, ast.MapValue) for e in value.entries):
            printer.emit(indent, f"{head}:", 0)
            for inner in value.entries:
                printer.emit(indent + INDENT, f"{_key(inner.key)}: {ast_inline(inner.value)}", 0)
        elif isinstance(value, ast.ListValue) and any(
                isinstance(item, ast.MapValue) or isinstance(item, ast.Ref) and not item.is_plain
                for item in value.items):
            printer.emit(indent, f"{head}:", 0)
            for item in value.items:
                printer.emit(indent + INDENT, f"- {ast_inline(item)}", 0)
        else:
            printer.emit(indent, f"{head}: {ast_inline(value)}", 0)


def ast_inline(value: ast.Value) -> str:
    """An AST value on one line."""
    if isinstance(value, ast.Bool):
        return "true" if value.value else "false"
    if isinstance(value, ast.Null):
        return "null"
    if isinstance(value, ast.Number):
        return repr(value.value) if isinstance(value.value, float) else str(value.value)
    if isinstance(value, ast.String):
        return _string(value.value)
    if isinstance(value, ast.Tagged):
        return f"{value.tag} {_string(value.path)}"
    if isinstance(value, ast.Ref):
        return value.text()
    if isinstance(value, ast.ListValue):
        return "[" + ", ".join(ast_inline(item) for item in value.items) + "]"
    if isinstance(value, ast.Call):
        return f"{value.name}(" + ", ".join(ast_inline(arg) for arg in value.args) + ")"
    return "{" + ", ".join(f"{_key(e.key)}: {ast_inline(e.value)}" for e in value.entries) + "}"


def _key(key: str) -> str:
    return key if NAME.match(key) else _string(key)


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
