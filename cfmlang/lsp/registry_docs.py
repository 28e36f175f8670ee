"""Method and parameter documentation from the method registry, for hover and completion."""
from __future__ import annotations

from pydantic import BaseModel

from cfmlang.frontend import ast
from cfmlang.ops.catalogue import parameter_rows
from cfmlang.ops.registry import Method, lookup, names_for

METHOD_KEYS = {"brick": "kind"}
"""The key that names a statement's method (`method:` unless listed)."""
ALSO_SEARCHED = {"merge": ("adapter_merge",)}
"""Registry keywords a statement's methods may also live under (merges of lora bricks)."""


def method_key(keyword: str) -> str:
    return METHOD_KEYS.get(keyword, "method")


def methods_for(keyword: str) -> list[str]:
    names = set(names_for(keyword))
    for other in ALSO_SEARCHED.get(keyword, ()):
        names |= set(names_for(other))
    return sorted(names)


def find_method(keyword: str, name: str) -> type[Method] | None:
    for registry_keyword in (keyword, *ALSO_SEARCHED.get(keyword, ())):
        found = lookup(registry_keyword, name)
        if found is not None:
            return found
    return None


def method_of(decl: ast.Decl) -> type[Method] | None:
    if not isinstance(decl.body, ast.MapValue):
        return None
    entry = decl.body.get(method_key(decl.keyword))
    value = entry.value if entry is not None else None
    if isinstance(value, ast.Call) and value.args:     # `method: one_of(ties, dare_ties)`: the first
        value = value.args[0]
    if not isinstance(value, ast.Ref):
        return None
    return find_method(decl.keyword, value.name)


def parameter_models(method: type[Method]) -> list[type[BaseModel]]:
    return [m for m in (method.Options, getattr(method, "Input", None)) if m is not None]


def parameter_names(method: type[Method]) -> list[str]:
    return [f.alias or name for model in parameter_models(method) for name, f in model.model_fields.items()]


def method_doc(keyword: str, method: type[Method]) -> str:
    lines = [f"**{keyword}** method `{method.name}`", "", method.summary or ""]
    for title, model in (("node options", method.Options), ("per-input parameters", getattr(method, "Input", None))):
        rows = [parameter_doc_row(model, name) for name in (f.alias or n for n, f in model.model_fields.items())] \
            if model is not None else []
        if rows:
            lines += ["", f"{title}:"] + [f"- {row}" for row in rows]
    return "\n".join(lines)


def parameter_doc(method: type[Method], key: str) -> str | None:
    for model in parameter_models(method):
        row = parameter_doc_row(model, key)
        if row:
            return f"`{method.name}` parameter {row}"
    return None


def parameter_doc_row(model: type[BaseModel], key: str) -> str | None:
    """`name` (type, default) and the field's bounds, e.g. `ge=0, le=1`."""
    for (name, field), row in zip(model.model_fields.items(), parameter_rows(model)):
        if (field.alias or name) == key:
            bounds = [_bound(m) for m in field.metadata]
            bounds = [b for b in bounds if b]
            return row + (f" — range {', '.join(bounds)}" if bounds else "")
    return None


def _bound(constraint) -> str:
    for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
        value = getattr(constraint, attribute, None)
        if value is not None:
            return f"{symbol} {value}"
    return ""
