"""lark tree -> AST (frozen dataclasses with spans).

A statement whose literals are invalid (a string's escapes, a number's range) is left out
like one with a syntax error: both become the program's `broken` statements."""
from __future__ import annotations

import json
import math
import re

from lark import Token, Tree

from cfmlang.diagnostics import SOURCES, Diagnostic, Span, error, raise_if_errors
from cfmlang.frontend import ast
from cfmlang.frontend.parser import Failed, parse_tree
from cfmlang.frontend.parser import parse_recovering as parse_recovering_tree

LITERAL_WORDS = {"true": True, "false": False}


HEAD = re.compile(r"([A-Za-z_]\w*)(?:[ \t]+([A-Za-z_]\w*))?")
"""The first words of a statement's first line: `KEYWORD NAME`, `SETTING`, `import`."""


def to_ast(tree: Tree, file: str) -> ast.Program:
    """The program of a tree; raises CompileError when a literal is invalid (a string's
    escapes, a number's range)."""
    program = _program(tree, file)
    raise_if_errors(program.problems)
    return program


def _program(tree: Tree, file: str, failed: tuple[Failed, ...] = (),
             problems: tuple[Diagnostic, ...] = ()) -> ast.Program:
    """The statements of `tree` whose literals are valid; the others, and those that did
    not parse (`failed`, with their syntax errors `problems`), are the program's broken
    statements."""
    builder = _Builder(file)
    statements: list[ast.Statement] = []
    broken = [_broken_head(f, file) for f in failed]
    for child in tree.children:
        if not isinstance(child, Tree):
            continue
        known = len(builder.problems)
        statement = builder.statement(child)
        if len(builder.problems) == known:
            statements.append(statement)
        else:
            broken.append(_broken_statement(statement))
    broken.sort(key=lambda b: (b.span.line, b.span.col))
    found = sorted((*problems, *builder.problems), key=lambda d: (d.span.line, d.span.col))
    return ast.Program(file, tuple(statements), tuple(broken), tuple(found))


def _broken_head(failed: Failed, file: str) -> ast.Broken:
    """What a statement that did not parse declares, read from its first line."""
    span = Span(file, failed.line, 1, failed.line, len(failed.head) + 1)
    words = HEAD.match(failed.head.lstrip())
    if words is None:
        return ast.Broken(None, None, span)
    keyword, name = words.groups()
    names_nothing = keyword == "import" or keyword in ast.SETTINGS
    return ast.Broken(keyword, None if names_nothing else name, span)


def _broken_statement(statement: ast.Statement) -> ast.Broken:
    if isinstance(statement, ast.Decl):
        return ast.Broken(statement.keyword, statement.name, statement.span)
    if isinstance(statement, ast.Setting):
        return ast.Broken(statement.key, None, statement.span)
    return ast.Broken(statement.keyword, None, statement.span)


UNFIT = re.compile("[\0\ud800-\udfff]")
"""Characters program text may not hold: NUL, and the surrogates UTF-8 cannot encode."""


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.problems = []

    def span(self, node) -> Span:
        if isinstance(node, Token):
            return Span(self.file, node.line, node.column, node.end_line, node.end_column)
        meta = node.meta
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def string(self, token: Token) -> str:
        try:
            value = json.loads(str(token))
        except ValueError:
            self.problems.append(error("E006", "invalid escape sequence in string",
                                       self.span(token), 'use JSON escapes such as \\" and \\n'))
            return str(token)[1:-1]
        found = UNFIT.search(value)
        unfit = found.group() if found else None
        if unfit is not None:
            what, hint = (("a NUL character", "no name, path or text may hold one") if unfit == "\0" else
                          ("a lone surrogate", "write a character beyond U+FFFF as a pair, e.g. \\ud83d\\ude00"))
            self.problems.append(error("E006", f"string escapes {what} (\\u{ord(unfit):04x})",
                                       self.span(token), hint))
            return str(token)[1:-1]
        return value

    def statement(self, node: Tree) -> ast.Statement:
        if node.data == "decl":
            keyword, name, body = node.children
            return ast.Decl(str(keyword), self.span(keyword), str(name), self.span(name),
                            self.body(body), self.span(node))
        if node.data == "setting":
            key, body = node.children
            return ast.Setting(self.key(key), self.span(key), self.body(body), self.span(node))
        keyword, path = node.children
        return ast.Import(str(keyword), self.span(keyword), self.string(path),
                          self.span(path), self.span(node))

    def key(self, token: Token) -> str:
        return self.string(token) if token.type == "STRING" else str(token)

    def body(self, node: Tree) -> ast.Value:
        if node.data == "inline_body":
            return self.value(node.children[0])
        block = node.children[0]
        if block.data == "map_block":
            entries = tuple(self.entry(e.children[0], e.children[1]) for e in block.children)
            return ast.MapValue(entries, self.span(block))
        items = tuple(self.value(item.children[0]) for item in block.children)
        return ast.ListValue(items, self.span(block))

    def entry(self, key: Token, body: Tree) -> ast.Entry:
        return ast.Entry(self.key(key), self.span(key), self.body(body))

    def value(self, node) -> ast.Value:
        span = self.span(node)
        kind = node.data
        if kind == "number":
            text = str(node.children[0])
            number = float(text) if any(c in text for c in ".eE") else _integer(text)
            if number is None or isinstance(number, int) and abs(number) >= 2**63 or not math.isfinite(number):
                shown = text if len(text) <= 24 else f"{text[:20]}..."
                self.problems.append(error("E032", f"number `{shown}` is out of range",
                                           span, "numbers are 64-bit: integers below 2**63 in magnitude, "
                                           "decimals below about 1.8e308"))
            return ast.Number(0 if number is None else number, span)
        if kind == "string":
            return ast.String(self.string(node.children[0]), span)
        if kind == "tagged":
            tag, path = node.children
            return ast.Tagged(str(tag), self.string(path), span, self.span(tag))
        if kind == "list":
            return ast.ListValue(tuple(self.value(c) for c in node.children if c is not None), span)
        if kind == "map":
            pairs = [c for c in node.children if c is not None]
            return ast.MapValue(tuple(self.entry_inline(p) for p in pairs), span)
        if kind == "call":
            name, *args = node.children
            return ast.Call(str(name), self.span(name), tuple(self.value(a) for a in args if a is not None), span)
        return self.ref(node, span)

    def entry_inline(self, pair: Tree) -> ast.Entry:
        key, value = pair.children
        return ast.Entry(self.key(key), self.span(key), self.value(value))

    def ref(self, node: Tree, span: Span) -> ast.Value:
        name, *accessors = node.children
        if not accessors and str(name) in LITERAL_WORDS:
            return ast.Bool(LITERAL_WORDS[str(name)], span)
        if not accessors and str(name) == "null":
            return ast.Null(span)
        return ast.Ref(str(name), tuple(self.accessor(a) for a in accessors), span,
                       self.span(name))

    def accessor(self, node: Tree) -> ast.Accessor:
        span = self.span(node)
        if node.data == "attr":
            return ast.Attr(str(node.children[0]), span)
        if node.data == "all_index":
            return ast.Index(None, None, False, True, span)
        if node.data == "one_index":
            return ast.Index(self.index(node.children[0], span), None, False, False, span)
        start, stop = (None if c is None else self.index(c, span) for c in node.children)
        return ast.Index(start, stop, True, False, span)

    def index(self, token, span) -> int:
        value = _integer(str(token))
        if value is None:
            self.problems.append(error("E032", f"index `{str(token)[:20]}...` is out of range", span,
                                       "layer indexes are small integers"))
            return 0
        return value


INTEGER_DIGITS = 19
"""Digits of the largest integer a program may hold (2**63 has 19): longer ones are out of
range without being converted (Python refuses to convert more than 4300 digits)."""


def _integer(text: str) -> int | None:
    """The value of an integer literal, None when it has more digits than any 64-bit one."""
    return int(text) if len(text.lstrip("+-").lstrip("0")) <= INTEGER_DIGITS else None


def parse(text: str, file: str = "<input>") -> ast.Program:
    """Source text -> AST; raises CompileError with all syntax errors."""
    SOURCES.texts[file] = text
    return to_ast(parse_tree(text, file), file)


def parse_recovering(text: str, file: str = "<input>") -> ast.Program:
    """Source text -> the AST of the statements without syntax errors; the errors are the
    program's `problems` and the statements they are in its `broken`. Raises
    CompileError only when no statement can be kept (parser.parse_recovering)."""
    SOURCES.texts[file] = text
    recovered = parse_recovering_tree(text, file)
    return _program(recovered.tree, file, recovered.failed, recovered.problems)
