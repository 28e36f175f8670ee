"""The method catalogue: every registered method with its parameters, rendered from the
registry itself so the reference can never drift from the code (docs/methods.md is this
output; a test keeps it so)."""
from __future__ import annotations

from typing import Annotated, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cfmlang.stdlib.registry import REGISTRY, Method

KEYWORD_ORDER = ("merge", "adapter_merge", "brick", "grow", "route", "update")
HEADINGS = {"adapter_merge": "merge over lora bricks (PEFT `add_weighted_adapter`)"}


def parameter_rows(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    rows = []
    for name, field in model.model_fields.items():
        shown = field.alias or name
        kind = _type_name(field.annotation)
        default = "required" if field.default is PydanticUndefined else f"`{_plain(field.default)}`"
        rows.append(f"`{shown}` ({kind}, {default})")
    return rows


def _type_name(annotation) -> str:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return "one of " + " ".join(map(str, get_args(annotation)))
    if type(None) in get_args(annotation) and len(args) == 1:
        return _type_name(args[0]) + " or null"
    if get_origin(annotation) is Annotated:
        return _type_name(args[0])
    text = str(annotation).replace("typing.", "")
    if "dict[str" in text and "list[float]" in text:
        return "number, gradient or filter map"
    return {"<class 'bool'>": "bool", "<class 'int'>": "int", "<class 'float'>": "number",
            "<class 'str'>": "string"}.get(text, text.replace("Annotated[", "").split(",")[0])


def _plain(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def method_line(cls: type[Method]) -> str:
    options = parameter_rows(cls.Options)
    per_input = parameter_rows(getattr(cls, "Input", None))
    parts = [f"| `{cls.name}` | {cls.summary or ''} "]
    parts.append(f"| {getattr(cls, 'base', '—')} ")
    parts.append(f"| {'<br>'.join(options) or '—'} | {'<br>'.join(per_input) or '—'} |")
    return "".join(parts)


def methods_markdown() -> str:
    lines = ["# Method reference", "",
             "Generated from the method registry (`cfmc methods`). Node options go at the "
             "statement level; per-input parameters go under each input in `inputs:` (or at "
             "statement level as defaults for every input). Numbers marked *gradient* also "
             "take a list interpolated across layers or a map of tensor-name filters.", ""]
    for keyword in KEYWORD_ORDER:
        entries = sorted((c for (k, _), c in REGISTRY.items() if k == keyword), key=lambda c: c.name)
        done = [c for c in entries if c.implemented]
        planned = [c.name for c in entries if not c.implemented]
        lines += [f"## {HEADINGS.get(keyword, keyword)}", ""]
        if done:
            lines += ["| method | what it does | base | node options | per-input parameters |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [method_line(c) for c in done]
            lines.append("")
        if planned:
            lines += [f"Not implemented yet (E031): {', '.join(f'`{n}`' for n in planned)}.", ""]
    return "\n".join(lines)
