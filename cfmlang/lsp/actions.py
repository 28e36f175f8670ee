"""Diagnostics for the client, and quick fixes for every "did you mean `X`?"."""
from __future__ import annotations

import re

from lsprotocol import types

from cfmlang.diagnostics import Diagnostic
from cfmlang.lsp.positions import to_range

DID_YOU_MEAN = re.compile(r"did you mean `([^`]+)`\?")
SEVERITIES = {"error": types.DiagnosticSeverity.Error, "warning": types.DiagnosticSeverity.Warning}


def to_lsp(diagnostic: Diagnostic) -> types.Diagnostic:
    """The message with its help and notes; a did-you-mean's word travels in `data`."""
    message = "\n".join([diagnostic.message, *(f"help: {h}" for h in diagnostic.help),
                         *(f"note: {n}" for n in diagnostic.notes)])
    suggestion = next((m.group(1) for h in diagnostic.help for m in [DID_YOU_MEAN.search(h)] if m), None)
    return types.Diagnostic(range=to_range(diagnostic.span), message=message, code=diagnostic.code, source="cfmc",
                            severity=SEVERITIES.get(diagnostic.severity, types.DiagnosticSeverity.Information),
                            data={"replacement": suggestion} if suggestion else None)


def for_file(diagnostics, path: str) -> list[types.Diagnostic]:
    """The diagnostics located in `path`; those elsewhere (an imported file) or without a
    place are shown at the file's first line."""
    shown = []
    for d in diagnostics:
        if d.span is not None and d.span.file == path:
            shown.append(to_lsp(d))
        else:
            where = f" (in {d.span.file}:{d.span.line}:{d.span.col})" if d.span else ""
            top = types.Range(start=types.Position(line=0, character=0), end=types.Position(line=0, character=0))
            lsp = to_lsp(d)
            shown.append(types.Diagnostic(range=top, message=lsp.message + where, code=lsp.code,
                                          source="cfmc", severity=lsp.severity))
    return shown


def quick_fixes(uri: str, diagnostics: list[types.Diagnostic]) -> list[types.CodeAction]:
    fixes = []
    for d in diagnostics:
        replacement = d.data.get("replacement") if isinstance(d.data, dict) else None
        if replacement:
            edit = types.WorkspaceEdit(changes={uri: [types.TextEdit(range=d.range, new_text=replacement)]})
            fixes.append(types.CodeAction(title=f"replace with `{replacement}`", kind=types.CodeActionKind.QuickFix,
                                          diagnostics=[d], edit=edit, is_preferred=True))
    return fixes
