"""Diagnostics: spans, error codes, and rustc-style / JSON rendering.

Every stage collects `Diagnostic`s instead of raising on the first problem; a stage
that found errors raises `CompileError` carrying all of them, and the CLI renders them.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based, end exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    @staticmethod
    def point(file: str, line: int, col: int, width: int = 1) -> "Span":
        return Span(file, line, col, line, col + max(width, 1))


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    help: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    severity: str = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_json(self) -> dict:
        out = {"severity": self.severity, "code": self.code, "message": self.message,
               "help": list(self.help), "notes": list(self.notes)}
        if self.span is not None:
            s = self.span
            out["span"] = {"file": s.file, "line": s.line, "col": s.col,
                           "end_line": s.end_line, "end_col": s.end_col}
        return out


class CompileError(Exception):
    """Raised by a stage that found user errors; carries every diagnostic of the stage."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = tuple(sorted(diagnostics, key=_position))
        super().__init__(render_plain(self.diagnostics))

    def __reduce__(self):
        """Pickled as its diagnostics, so that one raised in a Ray task reaches the driver whole."""
        return (CompileError, (self.diagnostics,))


def _position(d: Diagnostic) -> tuple:
    s = d.span
    return (0, "", 0, 0) if s is None else (1, s.file, s.line, s.col)


def error(code: str, message: str, span: Span | None = None, *helps: str,
          notes: Iterable[str] = ()) -> Diagnostic:
    return Diagnostic(code, message, span, tuple(h for h in helps if h), tuple(notes))


def warning(code: str, message: str, span: Span | None = None, *helps: str) -> Diagnostic:
    return Diagnostic(code, message, span, tuple(h for h in helps if h), (), "warning")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A 'did you mean' help line, or '' when nothing is close. A word more than 7/3 the
    length of every candidate cannot be close (difflib's ratio is at most 2 * shorter /
    (sum of lengths) < 0.6); it is not indexed, so a huge value costs nothing here."""
    candidates = sorted(set(candidates))
    if not candidates or 3 * len(word) > 7 * max(len(c) for c in candidates):
        return ""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else ""


def raise_if_errors(diagnostics: Sequence[Diagnostic]) -> None:
    if any(d.is_error for d in diagnostics):
        raise CompileError(diagnostics)


@dataclass
class SourceCache:
    """Source texts by file name, so renderers can quote the offending line. Each text is
    split into lines once (rendering N diagnostics of a file is linear in N and its size)."""

    texts: dict[str, str] = field(default_factory=dict)
    _lines: dict[str, tuple[str, list[str]]] = field(default_factory=dict, repr=False)
    """Each text split into lines once (rendering N diagnostics stays linear)."""

    def line(self, file: str, line: int) -> str | None:
        text = self.texts.get(file)
        if text is None:
            return None
        split = self._lines.get(file)
        if split is None or split[0] is not text:
            split = self._lines[file] = (text, text.splitlines())
        lines = split[1]
        return lines[line - 1] if 0 < line <= len(lines) else None


SOURCES = SourceCache()


def _render_one(d: Diagnostic, sources: SourceCache) -> str:
    head = f"{d.severity}[{d.code}]: {d.message}"
    if d.span is None:
        parts = [head]
    else:
        s = d.span
        parts = [f"{s.file}:{s.line}:{s.col}: {head}"]
        text = sources.line(s.file, s.line)
        if text is not None:
            gutter = " " * len(str(s.line))
            end = s.end_col if s.end_line == s.line else len(text) + 1
            width = max(1, end - s.col)
            parts.append(f"{gutter} |")
            parts.append(f"{s.line} | {text.expandtabs(1)}")
            parts.append(f"{gutter} | {' ' * (s.col - 1)}{'^' * width}")
    parts += [f"  = help: {h}" for h in d.help]
    parts += [f"  = note: {n}" for n in d.notes]
    return "\n".join(parts)


def render_plain(diagnostics: Sequence[Diagnostic], sources: SourceCache = SOURCES) -> str:
    return "\n\n".join(_render_one(d, sources) for d in diagnostics)


def render_json(diagnostics: Sequence[Diagnostic]) -> str:
    return json.dumps({"diagnostics": [d.to_json() for d in diagnostics]}, indent=2)
