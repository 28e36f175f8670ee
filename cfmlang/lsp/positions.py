"""Spans (1-based, end exclusive) to LSP ranges (0-based) and back, and words at a position."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from lsprotocol import types

from cfmlang.diagnostics import Span

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def to_range(span: Span) -> types.Range:
    return types.Range(start=types.Position(line=span.line - 1, character=span.col - 1),
                       end=types.Position(line=span.end_line - 1, character=span.end_col - 1))


def contains(span: Span, position: types.Position) -> bool:
    here = (position.line + 1, position.character + 1)
    return (span.line, span.col) <= here <= (span.end_line, span.end_col)


def uri_to_path(uri: str) -> str:
    return unquote(urlparse(uri).path)


def path_to_uri(path: str) -> str:
    return Path(path).resolve().as_uri()


def word_at(text: str, position: types.Position) -> tuple[str, types.Range] | None:
    """The identifier under the cursor (touching it from either side), with its range."""
    lines = text.splitlines()
    if position.line >= len(lines):
        return None
    line = lines[position.line]
    for match in WORD.finditer(line):
        if match.start() <= position.character <= match.end():
            return match.group(), types.Range(
                start=types.Position(line=position.line, character=match.start()),
                end=types.Position(line=position.line, character=match.end()))
    return None
