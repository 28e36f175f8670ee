"""Completion from the text before the cursor (it works while the line does not parse):
keywords and settings at the start of a line, methods after `method:`/`kind:`, a method's
parameters at a key position, node names at a value position, paths inside quotes, and
the model's module names in a tensor-filter map."""
from __future__ import annotations

import re
from pathlib import Path

from lsprotocol import types

from cfmlang.frontend.resolve import KEYWORDS, SETTINGS, stdlib_path
from cfmlang.lsp.analysis import Analysis
from cfmlang.lsp.registry_docs import find_method, method_key, methods_for, parameter_names
from cfmlang.search.statement import KEYS as SEARCH_KEYS
from cfmlang.search.statement import SAMPLERS

STATEMENT_KEYS = {"search": SEARCH_KEYS}
"""The keys of statements that name no method."""
WORD_VALUES = {("search", "sampler"): SAMPLERS}
"""The words a key of a statement takes."""

DECL_LINE = re.compile(r"^([A-Za-z_]\w*)\s+([A-Za-z_]\w*)\s*:")
METHOD_LINE = re.compile(r"^\s+(method|kind)\s*:\s*(?:one_of\(\s*)?([A-Za-z_]\w*)")
QUOTED_PATH = re.compile(r'(?:^import\s+|\b(?:hf|gguf|peft|safetensors)\s+|data\s*:\s*)"([^"]*)$')
KEY_POSITION = re.compile(r"^(\s+)([A-Za-z_]\w*)?$")
VALUE_POSITION = re.compile(r"^\s*(?:-\s*)?([A-Za-z_]\w*)\s*:\s*(?:\[[^\]]*,\s*|\[)?([A-Za-z_]\w*)?$")
FILTER_POSITION = re.compile(r"\{\s*(?:[^{}]*,\s*)?([A-Za-z_]\w*)?$")


def complete(analysis: Analysis | None, text: str, position: types.Position) -> list[types.CompletionItem]:
    lines = text.splitlines()
    line = lines[position.line] if position.line < len(lines) else ""
    before = line[:position.character]
    keyword, method = enclosing_statement(lines, position.line)
    quoted = QUOTED_PATH.search(before)
    if quoted:
        return path_items(quoted.group(1), Path(analysis.path if analysis else ".").parent, before.startswith("import"))
    if not before or re.fullmatch(r"[A-Za-z_]\w*", before):
        return [item(k, types.CompletionItemKind.Keyword) for k in (*KEYWORDS, "import")] + \
            [item(s, types.CompletionItemKind.Property) for s in SETTINGS]
    value = VALUE_POSITION.match(before)
    if value and (keyword, value.group(1)) in WORD_VALUES:
        return [item(w, types.CompletionItemKind.EnumMember) for w in WORD_VALUES[keyword, value.group(1)]]
    if value and keyword and value.group(1) == method_key(keyword) and keyword not in STATEMENT_KEYS:
        return [item(m, types.CompletionItemKind.EnumMember) for m in methods_for(keyword)]
    if value:
        return node_items(analysis)
    if FILTER_POSITION.search(before) and analysis is not None:
        return module_items(analysis, lines, position.line)
    if KEY_POSITION.match(before) and keyword in STATEMENT_KEYS:
        return [item(k, types.CompletionItemKind.Property) for k in STATEMENT_KEYS[keyword]]
    if KEY_POSITION.match(before) and keyword:
        found = find_method(keyword, method) if method else None
        keys = parameter_names(found) if found else [method_key(keyword)]
        return [item(k, types.CompletionItemKind.Property) for k in keys]
    return []


def item(label: str, kind: types.CompletionItemKind, detail: str | None = None) -> types.CompletionItem:
    return types.CompletionItem(label=label, kind=kind, detail=detail)


def enclosing_statement(lines: list[str], line_number: int) -> tuple[str | None, str | None]:
    """The keyword of the declaration the line is in, and its method (when written)."""
    start = line_number
    while start >= 0 and not DECL_LINE.match(lines[start] if start < len(lines) else ""):
        if start < len(lines) and lines[start][:1].isalpha() and start != line_number:
            return None, None
        start -= 1
    if start < 0:
        return None, None
    keyword = DECL_LINE.match(lines[start]).group(1)
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][:1].isspace() or lines[end].startswith("#")):
        end += 1
    for body_line in lines[start + 1:end]:
        found = METHOD_LINE.match(body_line)
        if found and found.group(1) == method_key(keyword):
            return keyword, found.group(2)
    return keyword, None


def node_items(analysis: Analysis | None) -> list[types.CompletionItem]:
    if analysis is None:
        return []
    return [item(name, types.CompletionItemKind.Reference, decl.keyword)
            for name, decl in sorted(analysis.declarations().items())]


def module_items(analysis: Analysis, lines: list[str], line_number: int) -> list[types.CompletionItem]:
    """Module names of the tensors of the models the program reads (`self_attn`, `mlp`,
    `q_proj` ...), for tensor-name filter maps, plus `default`."""
    names = {"default"}
    for node in analysis.checked.nodes if analysis.checked else ():
        arch = getattr(node, "arch", None)
        for tensor in arch.tensors if arch else ():
            names |= {part for part in tensor.name.split(".")[:-1] if not part.isdigit()}
    return [item(n, types.CompletionItemKind.Module) for n in sorted(names)]


def path_items(typed: str, base_dir: Path, is_import: bool) -> list[types.CompletionItem]:
    folder_part, _, _ = typed.rpartition("/")
    if is_import and (typed.startswith("std/") or folder_part == "std"):
        folder = stdlib_path("std")
    else:
        folder = (base_dir / folder_part) if folder_part else base_dir
    if not folder.is_dir():
        return []
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        label = entry.name + ("/" if entry.is_dir() else "")
        kind = types.CompletionItemKind.Folder if entry.is_dir() else types.CompletionItemKind.File
        items.append(item(label, kind))
    if is_import and not folder_part:
        items.append(item("std/", types.CompletionItemKind.Folder))
    return items
