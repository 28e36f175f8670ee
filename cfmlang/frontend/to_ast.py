"""lark tree -> AST (frozen dataclasses with spans)."""
from __future__ import annotations

import json
import math

from lark import Token, Tree

from cfmlang.diagnostics import SOURCES
from cfmlang.frontend import ast
from cfmlang.frontend.parser import parse_tree
from cfmlang.diagnostics import CompileError, Span, error

LITERAL_WORDS = {"true": True, "false": False}


def to_ast(tree: Tree, file: str) -> ast.Program:
    builder = _Builder(file)
    statements = tuple(builder.statement(child) for child in tree.children
                       if isinstance(child, Tree))
    if builder.problems:
        raise CompileError(builder.problems)
    return ast.Program(file, statements)


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
        unfit = next((c for c in value if c == "\0" or "\ud800" <= c <= "\udfff"), None)
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
            number = float(text) if any(c in text for c in ".eE") else int(text)
            if isinstance(number, int) and abs(number) >= 2**63 or not math.isfinite(number):
                self.problems.append(error("E032", f"number `{text}` is out of range",
                                           span, "numbers are 64-bit: integers below 2**63 in magnitude, "
                                           "decimals below about 1.8e308"))
            return ast.Number(number, span)
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
            return ast.Index(int(node.children[0]), None, False, False, span)
        start, stop = (None if c is None else int(c) for c in node.children)
        return ast.Index(start, stop, True, False, span)


def parse(text: str, file: str = "<input>") -> ast.Program:
    """Source text -> AST; raises CompileError with all syntax errors."""
    SOURCES.texts[file] = text
    return to_ast(parse_tree(text, file), file)
