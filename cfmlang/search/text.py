"""A trial's program: the searched file's text with every open value written in, without
its search statement, with `output:` naming the target, in `cfmc fmt`'s layout. It is an
ordinary program; compiled from the searched file's folder it builds the trial's model."""
from __future__ import annotations

from dataclasses import dataclass

from cfmlang.diagnostics import Span
from cfmlang.frontend.format import format_source
from cfmlang.frontend.parser import normalise
from cfmlang.search.program import SearchProgram


@dataclass(frozen=True)
class Edit:
    start: tuple[int, int]      # (line, col), 1-based
    end: tuple[int, int]        # exclusive
    text: str


def program_text(source: str, opened: SearchProgram, values: dict[str, object], header: list[str] = ()) -> str:
    """`source` (the searched file's text) with the dimension named N written as
    `values[N]`, the search statement removed and `output: TARGET`; `header` becomes
    leading comment lines."""
    source = normalise(source)
    edits = [Edit((d.span.line, d.span.col), (d.span.end_line, d.span.end_col), d.text(values[d.name]))
             for d in opened.dimensions]
    for statement in opened.statements:
        end_line = statement.span.end_line if statement.span.end_col > 1 else statement.span.end_line - 1
        edits.append(Edit((statement.span.line, 1), (end_line + 1, 1), ""))
    target = opened.search.target
    output = next((s for s in opened.resolved.settings if s.key == "output"), None)
    if output is not None:
        span: Span = output.value.span
        edits.append(Edit((span.line, span.col), (span.end_line, span.end_col), target))
    text = apply(source, edits)
    if output is None:
        text = text.rstrip("\n") + f"\n\noutput: {target}\n"
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return format_source(comments + ("\n" if comments else "") + text.lstrip("\n"), "<search>")


def apply(source: str, edits: list[Edit]) -> str:
    starts = [0]
    for line in source.split("\n"):
        starts.append(starts[-1] + len(line) + 1)

    def offset(position: tuple[int, int]) -> int:
        line, col = position
        return min(starts[line - 1] + col - 1, len(source)) if line - 1 < len(starts) else len(source)
    for edit in sorted(edits, key=lambda e: e.start, reverse=True):
        source = source[:offset(edit.start)] + edit.text + source[offset(edit.end):]
    return source
