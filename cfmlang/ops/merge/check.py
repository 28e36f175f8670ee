"""Checking `merge` statements over models: the method's node options and per-input
parameters validated by its pydantic models, inputs bound, architectures compared, and
tensor-name filter maps checked against the tensors."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, create_model

from cfmlang.compiler.ir import ArchInfo, MergeNode
from cfmlang.diagnostics import did_you_mean, error, warning
from cfmlang.frontend import ast
from cfmlang.ops.merge.base import MergeMethod, input_count_problem
from cfmlang.ops.merge.vocabulary_check import check_chat_template, check_vocabulary, template_tokenizer
from cfmlang.ops.registry import FILTER_DEFAULT, aliases

MERGE_KEYS = ("method", "inputs", "base", "dtype", "seed", "description", "tokenizer", "chat_template")


def check_merge(checker, decl: ast.Decl, body: ast.MapValue, method: type[MergeMethod],
                base_dir: Path) -> MergeNode | None:
    shared = _shared_model(method)
    allowed = MERGE_KEYS + tuple(aliases(shared))
    checker.unknown_keys(body, allowed, f"merge `{decl.name}` (method {method.name})")
    before = len(checker.problems)
    base = checker.model_ref(body.get("base"), "base") if body.get("base") else None
    if method.base == "required" and body.get("base") is None:
        checker.problems.append(error("E014", f"merge method `{method.name}` needs a `base:` model",
                                   body.get("method").value.span,
                                   f"name {method.base_role}"))
    if method.base == "none" and body.get("base") is not None:
        checker.problems.append(error("E013", f"merge method `{method.name}` takes no `base:`",
                                   body.get("base").key_span, "remove it, or add the model to `inputs`"))
    option_entries = [e for e in body.entries if e.key in allowed and e.key not in MERGE_KEYS]
    options = checker.validate(shared, ast.MapValue(tuple(option_entries), body.span), body.span)
    inputs = checker.merge_inputs(decl, body, method, options)
    dtype = checker.dtype(body.get("dtype"))
    seed = checker.seed(body.get("seed").value) if body.get("seed") else None
    if len(checker.problems) > before or options is None or inputs is None:
        return None
    shared_names = set(aliases(method.Options))
    shared_values = {k: v for k, v in options.items() if k in shared_names}
    models = [base] * (base is not None) + [i.model for i in inputs]
    tokenizer = body.get("tokenizer")
    arch = checker.compatible(decl, [m for m in models if m], vocab=tokenizer is None)
    if arch is None or not checker.float_tensors(decl, [m for m in models if m]):
        return None
    if base in [i.model for i in inputs]:
        inputs = tuple(i for i in inputs if i.model != base)
    if not input_count(checker, method, inputs, body.get("inputs").value) or \
            not filters(checker, body, arch, method):
        return None
    if arch.layout is None and _has_gradient(shared_values, inputs) and \
            checker.layout_of(models[0], "a gradient across layers", decl.name_span) is None:
        return None
    vocabulary = None
    if tokenizer is not None:
        planned = check_vocabulary(checker, decl, tokenizer, base, [i.model for i in inputs], arch)
        if planned is None:
            return None
        vocabulary, arch = planned
    chat = body.get("chat_template")
    template = check_chat_template(checker, chat, [m for m in dict.fromkeys(models) if m], base_dir) \
        if chat is not None else None
    if chat is not None and (template is None or vocabulary is None and
                             not template_tokenizer(checker, models[0], chat.key_span)):
        return None
    return MergeNode(decl.name, decl.span, method.name, base, inputs,
                     tuple(sorted(shared_values.items())), dtype, seed, arch, vocabulary=vocabulary,
                     chat_template=template)


def input_count(checker, method, inputs, span_value) -> bool:
    problem = input_count_problem(method, len(inputs))
    if problem:
        checker.problems.append(error("E034", problem, span_value.span,
                                   "the base is named with `base:`, not in `inputs`"
                                   if method.base != "none" else ""))
    return problem is None


def filters(checker, body: ast.MapValue, arch: ArchInfo, method) -> bool:
    """Check tensor-name filter maps: each key should match some tensor (else a
    warning), and every tensor needs a value (else an error)."""
    fields = set(aliases(method.Input)) | set(aliases(method.Options))
    maps = [e for e in body.entries if e.key in fields and isinstance(e.value, ast.MapValue)]
    inputs = body.get("inputs").value
    for per_input in (inputs.entries if isinstance(inputs, ast.MapValue) else ()):
        if isinstance(per_input.value, ast.MapValue):
            maps += [e for e in per_input.value.entries
                     if e.key in fields and isinstance(e.value, ast.MapValue)]
    names = [t.name for t in arch.tensors]
    ok = True
    for entry in maps:
        keys = [e for e in entry.value.entries if e.key != FILTER_DEFAULT]
        for key in keys:
            if names and not any(key.key in n for n in names):
                checker.problems.append(warning(
                    "W003", f"filter `{key.key}` of `{entry.key}` matches no tensor", key.key_span,
                    did_you_mean(key.key, _module_names(names)) or
                    f"filters are parts of tensor names, e.g. {', '.join(sorted(_module_names(names))[:6])}"))
        if entry.value.get(FILTER_DEFAULT) is None:
            unmatched = [n for n in names if not any(k.key in n for k in keys)]
            if unmatched:
                ok = False
                checker.problems.append(error(
                    "E014", f"`{entry.key}` has no value for tensor `{unmatched[0]}`"
                    + (f" and {len(unmatched) - 1} more" if len(unmatched) > 1 else ""),
                    entry.value.span, f"add `{FILTER_DEFAULT}: ...` for tensors no filter matches"))
    return ok


def _module_names(tensor_names: list[str]) -> set[str]:
    return {part for name in tensor_names for part in name.split(".")
            if not part.isdigit() and part not in ("model", "weight", "bias", "layers")}


@functools.lru_cache(maxsize=None)
def _shared_model(method: type[MergeMethod]) -> type[BaseModel]:
    """Node-level options: the method's shared options plus per-input defaults (built once
    per method: pydantic builds a model class in milliseconds, which each re-check paid),
    with the defaults' declared ranges."""
    fields = {name: (Annotated[(f.annotation | None, *f.metadata)] if f.metadata else f.annotation | None, None)
              for name, f in method.Input.model_fields.items()}
    return create_model(f"{method.__name__}NodeOptions", __base__=method.Options, **fields)


def _has_gradient(options: dict, inputs) -> bool:
    """Whether a parameter is a list interpolated across layers (directly or in a filter map)."""
    values = list(options.values()) + [v for i in inputs for _, v in i.params]
    values += [v for value in values if isinstance(value, dict) for v in value.values()]
    return any(isinstance(value, list) for value in values)
