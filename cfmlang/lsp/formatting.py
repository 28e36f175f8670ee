"""textDocument/formatting: the whole document in `cfmc fmt`'s layout, as one edit (none
when it is already canonical or does not parse: the diagnostics already say why)."""
from __future__ import annotations

from lsprotocol import types

from cfmlang.diagnostics import CompileError
from cfmlang.frontend.format import format_source
from cfmlang.lsp.analysis import Analysis


def formatting_edits(analysis: Analysis) -> list[types.TextEdit]:
    try:
        formatted = format_source(analysis.text, analysis.path)
    except CompileError:
        return []
    if formatted == analysis.text:
        return []
    lines = analysis.text.split("\n")
    end = types.Position(line=len(lines) - 1, character=len(lines[-1]))
    return [types.TextEdit(range=types.Range(start=types.Position(line=0, character=0), end=end),
                           new_text=formatted)]
