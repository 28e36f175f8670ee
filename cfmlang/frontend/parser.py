"""Source text -> lark tree, with syntax errors turned into diagnostics.

The grammar is LALR(1); indentation is handled by lark's Indenter post-lexer.
When a file has syntax errors (tabs in indentation included), every other top-level
statement is re-parsed on its own so that all of them are reported at once;
`parse_recovering` also returns the tree of the statements that parse, so that the
later stages check them (linear in the file's size: each statement is parsed alone once,
and the file once more with the failed statements blanked out).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.indenter import DedentError, Indenter

from cfmlang.diagnostics import CompileError, Diagnostic, Span, error
from cfmlang.frontend.ast import SETTINGS

TOKEN_WORDS = {
    "_NL": "end of line", "_INDENT": "an indented block", "_DEDENT": "end of block",
    "NAME": "a name", "STRING": "a string", "SIGNED_NUMBER": "a number",
    "SIGNED_INT": "an integer", "COLON": "`:`", "COMMA": "`,`", "LSQB": "`[`",
    "RSQB": "`]`", "LBRACE": "`{`", "RBRACE": "`}`", "MINUS": "`-`", "DOT": "`.`",
    "STAR": "`*`", "LPAR": "`(`", "RPAR": "`)`", "$END": "the end of the file",
}


class CfmIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LSQB", "LBRACE"]
    CLOSE_PAREN_types = ["RSQB", "RBRACE"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("cfmlang.frontend").joinpath("cfm.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", postlex=CfmIndenter(),
                propagate_positions=True, maybe_placeholders=True)


@dataclass(frozen=True)
class Failed:
    """A line that begins a top-level statement that does not parse: its number
    (1-based) and text."""

    line: int
    head: str


@dataclass(frozen=True)
class Recovered:
    """The statements of a file that parse (a tree whose positions are those of the file),
    the syntax errors of the others, and those others."""

    tree: Tree
    problems: tuple[Diagnostic, ...]
    failed: tuple[Failed, ...]


def parse_tree(text: str, file: str) -> Tree:
    """Parse one file; raise CompileError with every syntax error found."""
    text = normalise(text)
    tree, tabs = _parse_whole(text, file)
    if tree is not None:
        return tree
    problems, _ = _errors_per_statement(text, file, {d.span.line for d in tabs})
    raise CompileError(_in_order(tabs + problems))


def parse_recovering(text: str, file: str) -> Recovered:
    """Parse one file, leaving out the top-level statements with syntax errors. Raises
    CompileError only when nothing can be kept (nesting beyond MAX_NESTING, or an error
    that no statement shows on its own)."""
    text = normalise(text)
    tree, tabs = _parse_whole(text, file)
    if tree is not None:
        return Recovered(tree, (), ())
    problems, failed = _errors_per_statement(text, file, {d.span.line for d in tabs})
    problems = _in_order(tabs + problems)
    lines = text.split("\n")
    for first_line, chunk in failed:
        for index in range(first_line - 1, min(first_line - 1 + chunk.count("\n"), len(lines))):
            lines[index] = ""
    try:
        tree = _parser().parse("\n".join(lines))
    except (UnexpectedInput, DedentError):
        raise CompileError(problems) from None
    heads = tuple(Failed(first_line + offset, head) for first_line, chunk in failed
                  for offset, head in _heads(chunk))
    return Recovered(tree, tuple(problems), heads)


def _parse_whole(text: str, file: str) -> tuple[Tree | None, list[Diagnostic]]:
    """The tree of a file without syntax errors (else None), and its tab problems.
    Raises E144 when the file nests too deep to be parsed at all."""
    problems = _nesting_problems(text, file)
    if problems:
        raise CompileError(problems)
    tabs = _tab_problems(text, file)
    if not tabs:
        try:
            return _parser().parse(text), tabs
        except (UnexpectedInput, DedentError):
            pass
    return None, tabs


def _in_order(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    return sorted(diagnostics, key=lambda d: (d.span.line, d.span.col))


def _heads(chunk: str) -> list[tuple[int, str]]:
    """(offset, text) of the lines of a failed statement's chunk that may begin a
    statement: its first line that is neither blank nor a comment (a chunk may begin with
    the comments above the file's first statement), and every later line at column 0
    (a statement swallowed by a bracket left open above it)."""
    heads = []
    for offset, line in enumerate(chunk.split("\n")):
        if line.strip() and not line.lstrip().startswith("#") and (not heads or line[:1] not in " \t"):
            heads.append((offset, line))
    return heads


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return text if text.endswith("\n") else text + "\n"


def _tab_problems(text: str, file: str) -> list[Diagnostic]:
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        indent = re.match(r"[ \t]*", line).group(0)
        if "\t" in indent and line.strip() and not line.strip().startswith("#"):
            col = indent.index("\t") + 1
            out.append(error("E004", "tab character in indentation",
                             Span.point(file, number, col),
                             "indent with spaces only; tabs have no agreed width"))
    return out


MAX_NESTING = 64
"""Deepest nesting of blocks and brackets a file may use; far beyond any real program,
and well inside what the recursive stages after the parser can take."""


NESTING_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#.*|[\[\]{}]')
"""Strings and comments (skipped whole) and brackets."""


def _nesting_problems(text: str, file: str) -> list[Diagnostic]:
    """One E144 at the first block or bracket nested deeper than MAX_NESTING."""
    levels = [0]
    depth = 0   # brackets open
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.lstrip(" ")
        if depth == 0 and stripped and not stripped.startswith("#"):
            width = len(line) - len(stripped)
            while len(levels) > 1 and width < levels[-1]:
                levels.pop()
            if width > levels[-1]:
                levels.append(width)
        col = 1 if len(levels) - 1 > MAX_NESTING else None
        for token in NESTING_TOKENS.finditer(line):
            if col is not None:
                break
            char = token.group()
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth = max(depth - 1, 0)
            if len(levels) - 1 + depth > MAX_NESTING:
                col = token.start() + 1
        if col is not None:
            return [error("E144", f"nesting deeper than {MAX_NESTING} levels of blocks and brackets",
                          Span.point(file, number, col), "flatten the value; no method takes "
                          "anything nested this deep")]
    return []


def _bracket_scan(lines: list[str]):
    """Yield (line index, open brackets before that line) and track where each open
    bracket is, ignoring brackets inside strings and comments."""
    open_at: list[tuple[int, int]] = []
    for index, line in enumerate(lines):
        yield index, list(open_at)
        in_string = escaped = False
        for col, char in enumerate(line):
            if in_string:
                escaped = char == "\\" and not escaped
                in_string = escaped or char != '"'
            elif char == '"':
                in_string = True
            elif char == "#":
                break
            elif char in "[{":
                open_at.append((index, col))
            elif char in "]}" and open_at:
                open_at.pop()
    yield len(lines), list(open_at)


def _statement_chunks(text: str) -> list[tuple[int, str]]:
    """Split a file into top-level statements: (line number of the first line, the
    statement's text). A column-0 line inside an open bracket continues the statement."""
    lines = text.split("\n")
    starts = [i for i, still_open in _bracket_scan(lines)
              if i < len(lines) and not still_open and lines[i][:1] not in ("", " ", "\t", "#")]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    chunks = []
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        chunks.append((a + 1, "\n".join(lines[a:b]) + "\n"))
    return chunks


def _unclosed_bracket(chunk: str, before_line: int | None = None) -> tuple[int, int] | None:
    """1-based (line, col) of the innermost bracket still open at the start of line
    `before_line` (1-based), or at the end of `chunk`."""
    lines = chunk.split("\n")
    for index, still_open in _bracket_scan(lines):
        if before_line is not None and index + 1 == before_line or index == len(lines):
            return (still_open[-1][0] + 1, still_open[-1][1] + 1) if still_open else None
    return None


def _errors_per_statement(text: str, file: str, skipped_lines: set[int] = frozenset()
                          ) -> tuple[list[Diagnostic], list[tuple[int, str]]]:
    """The syntax error of each statement parsed on its own (linear in the file's size),
    leaving out statements with a line in `skipped_lines` (already reported); and every
    statement that failed, those left out included, as (line of its first line, text)."""
    found: list[Diagnostic] = []
    failed: list[tuple[int, str]] = []
    for first_line, chunk in _statement_chunks(text):
        lines = range(first_line, first_line + chunk.count("\n"))
        if any(line in skipped_lines for line in lines):
            failed.append((first_line, chunk))
            continue
        try:
            _parser().parse(chunk)
            continue
        except DedentError as exc:
            found.append(_moved_down(_dedent_error(exc, chunk, file), first_line - 1))
        except UnexpectedInput as exc:
            found.append(_moved_down(_syntax_error(exc, file, chunk), first_line - 1))
        failed.append((first_line, chunk))
    if not found and not skipped_lines:
        found = [error("E002", "syntax error", Span.point(file, 1, 1))]
    return found, failed


def _moved_down(diagnostic: Diagnostic, lines: int) -> Diagnostic:
    """`diagnostic` found in a statement parsed alone, placed where the statement is."""
    span = diagnostic.span
    return replace(diagnostic, span=replace(span, line=span.line + lines, end_line=span.end_line + lines))


def _dedent_error(exc: DedentError, chunk: str, file: str) -> Diagnostic:
    # lark does not say where; find the first line whose indent matches no open level.
    levels = [0]
    width_above = 0
    for number, line in enumerate(chunk.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        width = len(line) - len(line.lstrip(" "))
        if width > levels[-1]:
            levels.append(width)
            width_above = width
            continue
        while width < levels[-1]:
            levels.pop()
        if width != levels[-1]:
            widths = " or ".join(str(w) for w in sorted(set(levels + [width_above])))
            return error("E005", "this line's indentation matches no enclosing block",
                         Span.point(file, number, 1, width),
                         f"indent it by {widths} spaces, like the lines of an enclosing block")
        width_above = width
    return error("E005", f"inconsistent indentation: {exc}", Span.point(file, 1, 1))


def _expected_words(expected) -> str:
    words = sorted({TOKEN_WORDS.get(e, f"`{e.lower()}`" if e.isalpha() else e)
                    for e in expected if not e.startswith("__")})
    if not words:
        return ""
    return "expected " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1])


def _syntax_error(exc: UnexpectedInput, file: str, chunk: str) -> Diagnostic:
    line, col = max(exc.line, 1), max(exc.column, 1)
    # a statement starting at column 1 while a bracket is open: the bracket is the error
    at_line_start = col == 1 and isinstance(exc, UnexpectedToken) and exc.token.type == "NAME"
    unclosed = _unclosed_bracket(chunk, line if at_line_start else None)
    if at_line_start and unclosed:
        return error("E007", "this bracket is never closed", Span.point(file, *unclosed),
                     "close every `[` with `]` and every `{` with `}`")
    if isinstance(exc, UnexpectedCharacters):
        char = exc.char
        hint = "strings use double quotes" if char == "'" else ""
        return error("E001", f"unexpected character `{char}`", Span.point(file, line, col), hint)
    expected = set(getattr(exc, "expected", ()) or ())
    if unclosed and (isinstance(exc, UnexpectedEOF) or exc.token.type in ("$END", "_NL", "_DEDENT")) \
            and expected & {"RSQB", "RBRACE"}:
        return error("E007", "this bracket is never closed", Span.point(file, *unclosed),
                     "close every `[` with `]` and every `{` with `}`")
    if isinstance(exc, UnexpectedEOF):
        return error("E003", "unexpected end of file", Span.point(file, line, col),
                     _expected_words(exc.expected))
    assert isinstance(exc, UnexpectedToken)
    token: Token = exc.token
    if token.type == "_INDENT":
        # the indenter borrows the position of the newline before the indented line
        indented = token.end_line or line + 1
        return error("E002", "unexpected indentation", Span.point(file, indented, 1, len(str(token).split("\n")[-1])),
                     "indent this line like the lines of its block, or give the line above a `key:` "
                     "that opens a nested block")
    if token.type == "$END":
        return error("E003", "unexpected end of file", Span.point(file, line, col),
                     _expected_words(expected))
    described = TOKEN_WORDS.get(token.type, f"`{token}`")
    if token.type in ("NAME", "STRING", "SIGNED_NUMBER", "SIGNED_INT"):
        described = f"`{token}`"
    hint = _expected_words(expected)
    if token.type == "_NL" and "COLON" in expected:
        first_word = chunk.split("\n")[line - 1].split()[0]
        hint = (f"a setting is written `{first_word}: value`" if first_word in SETTINGS
                else "a declaration needs a `:` after its name")
    elif "COLON" in expected and token.type in ("NAME", "STRING", "SIGNED_NUMBER"):
        hint = "write `key: value`; a key needs a `:`"
    width = len(str(token)) if token.type not in ("_NL", "_INDENT", "_DEDENT") else 1
    return error("E002", f"unexpected {described}", Span.point(file, line, col, width), hint)
