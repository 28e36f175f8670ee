"""The method catalogue: every registered method with its parameters, rendered from the
registry itself so the reference can never drift from the code (docs/methods.md is this
output; a test keeps it so)."""
from __future__ import annotations

from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cfmlang.ops.experts.routers import ROUTER_BUILDERS
from cfmlang.ops.registry import REGISTRY, Method, Range

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
        bounds = declared_range(field.metadata, field.annotation)
        rows.append(f"`{shown}` ({kind}{' ' + bounds.text() if bounds else ''}, {default})")
    return rows


BOUNDS = {annotated_types.Ge: ("low", "ge", False), annotated_types.Gt: ("low", "gt", True),
          annotated_types.Le: ("high", "le", False), annotated_types.Lt: ("high", "lt", True)}
"""pydantic's bounds (`Field(ge=1)` ...) as the ends of a Range."""


def declared_range(metadata, annotation) -> Range | None:
    """The range a parameter declares: a Range, or pydantic's bounds, on the field or on
    its annotation (`Annotated[int, Field(ge=1)] | None`)."""
    ends = {}
    for item in metadata:
        if isinstance(item, Range):
            return item
        if isinstance(item, FieldInfo):
            found = declared_range(item.metadata, None)
            if found:
                return found
        if type(item) in BOUNDS:
            end, attribute, is_open = BOUNDS[type(item)]
            ends[end], ends[f"{end}_open"] = getattr(item, attribute), is_open
    if ends:
        return Range(**ends)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return declared_range(args[1:], args[0])
    if origin in (Union, UnionType):
        return next((r for r in (declared_range((), a) for a in args if a is not type(None)) if r), None)
    return None


def _type_name(annotation) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, UnionType):
        if "dict[str" in str(annotation) and "list[float]" in str(annotation):
            return "number, gradient or filter map"
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + (" or null" if len(rest) < len(args) else "")
    if origin is Literal:
        return "one of " + " ".join(map(str, args))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = ", ".join(f"{f.alias or name}: {_type_name(f.annotation)}"
                           for name, f in annotation.model_fields.items())
        return f"map {{{fields}}}"
    return {bool: "bool", int: "int", float: "number", str: "string"}.get(annotation, str(annotation))


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
        lines += [f"## {HEADINGS.get(keyword, keyword)}", ""]
        if entries:
            lines += ["| method | what it does | base | node options | per-input parameters |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [method_line(c) for c in entries]
            lines.append("")
    return "\n".join(lines + _routers())


def _routers() -> list[str]:
    """The routers a `topk` route may name, with what each builds."""
    lines = ["## routers of `route` `topk`", "", "| router | what it does |", "| --- | --- |"]
    for name, build in ROUTER_BUILDERS.items():
        summary = (build.__doc__ or "").strip().splitlines()[0] if build.__doc__ else ""
        lines.append(f"| `{name}` | {summary} |")
    return lines + [""]
