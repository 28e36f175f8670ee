"""Hover: a method's documentation, a parameter's type, default and range, or what a
node is (architecture, layers, dtype, tensors, what it reads)."""
from __future__ import annotations

from lsprotocol import types

from cfmlang.frontend import ast
from cfmlang.lsp.analysis import Analysis
from cfmlang.lsp.navigation import occurrence_at, refs_in
from cfmlang.lsp.positions import contains, to_range
from cfmlang.lsp.registry_docs import find_method, method_doc, method_key, method_of, parameter_doc


def hover(analysis: Analysis, position: types.Position) -> types.Hover | None:
    decl = enclosing_decl(analysis, position)
    found = (decl and (method_hover(decl, position) or parameter_hover(decl, position))) \
        or node_hover(analysis, position)
    if found is None:
        return None
    text, span = found
    return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=text), range=to_range(span))


def enclosing_decl(analysis: Analysis, position: types.Position) -> ast.Decl | None:
    if analysis.program is None:
        return None
    return next((s for s in analysis.program.statements
                 if isinstance(s, ast.Decl) and contains(s.span, position)), None)


def method_hover(decl: ast.Decl, position: types.Position):
    entry = decl.body.get(method_key(decl.keyword)) if isinstance(decl.body, ast.MapValue) else None
    if entry is None or not isinstance(entry.value, ast.Ref) or not contains(entry.value.span, position):
        return None
    method = find_method(decl.keyword, entry.value.name)
    return (method_doc(decl.keyword, method), entry.value.span) if method else None


def parameter_hover(decl: ast.Decl, position: types.Position):
    method = method_of(decl)
    entry = next((e for e in entries_in(decl.body) if contains(e.key_span, position)), None)
    if method is None or entry is None:
        return None
    doc = parameter_doc(method, entry.key)
    return (doc, entry.key_span) if doc else None


def entries_in(value: ast.Value) -> list[ast.Entry]:
    if isinstance(value, ast.MapValue):
        return [x for e in value.entries for x in (e, *entries_in(e.value))]
    if isinstance(value, ast.ListValue):
        return [x for item in value.items for x in entries_in(item)]
    return []


def node_hover(analysis: Analysis, position: types.Position):
    hit = occurrence_at(analysis, position)
    if hit is None:
        return None
    decl = analysis.declarations()[hit.name]
    lines = [f"**{decl.keyword}** `{hit.name}` (declared in {decl.span.file}:{decl.span.line})"]
    node = analysis.node(hit.name)
    arch = getattr(node, "arch", None)
    if node is not None:
        lines.append(f"- output: {node.node_type.value}")
    if arch is not None:
        dtypes = sorted({t.dtype for t in arch.tensors})
        lines += [f"- architecture: {arch.model_type}, {arch.num_layers} layers, hidden {arch.hidden_size}",
                  f"- dtype: {', '.join(dtypes) or 'unknown'}",
                  f"- tensors: {len(arch.tensors)}"]
    reads = sorted({r.name for r in refs_in(decl.body) if r.name in analysis.declarations()})
    lines.append(f"- reads: {', '.join(reads) if reads else 'nothing (a source)'}")
    return "\n".join(lines), hit.span
