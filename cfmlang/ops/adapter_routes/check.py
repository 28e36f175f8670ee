"""Checking `route ... method: retrieve | gate` over lora bricks (part of the check stage).

Binds the base model and the adapters (all lora bricks of that base), validates the
options and each adapter's `samples` (retrieve), and reads the gate's training text, so
that nothing fails after weights start loading.
"""
from __future__ import annotations

from pathlib import Path

from cfmlang.frontend import ast
from cfmlang.compiler.ir import AdapterRouteNode
from cfmlang.frontend.resolve import Declared
from cfmlang.diagnostics import error
from cfmlang.ops.adapter_routes.methods import Retrieve
from cfmlang.ops.lora.check import adapter_ref
from cfmlang.ops.update.finetune import DataError, read_texts

ROUTE_KEYS = ("method", "base", "inputs", "description")
INPUTS_HELP = {"retrieve": 'e.g. `inputs: {french: {samples: ["Bonjour !"]}, pirate: {samples: ["Ahoy!"]}}`',
               "gate": "e.g. `inputs: [french, pirate]`"}


def check_adapter_route(checker, declared: Declared, body: ast.MapValue, method) -> AdapterRouteNode | None:
    decl = declared.decl
    fields = tuple(method.Options.model_fields)
    checker.unknown_keys(body, ROUTE_KEYS + fields, f"route `{decl.name}` (method {method.name})")
    before = len(checker.problems)
    options = checker.validate(method.Options, ast.MapValue(tuple(e for e in body.entries if e.key in fields),
                                                            body.span), body.span)
    base = _base(checker, decl, body)
    adapters = _adapters(checker, decl, body, method)
    if len(checker.problems) > before or None in (options, base, adapters):
        return None
    names = [name for name, _ in adapters]
    layers = checker.nodes[base].arch.num_layers
    if not _same_base(checker, body, names, base) or not _enough(checker, body, options, len(names), layers):
        return None
    data = _training_text(checker, body, options, declared.base_dir)
    if data is False:
        return None
    kept = {k: v for k, v in options.items() if k != "train"}
    kept.update({f"train_{k}": v for k, v in (options.get("train") or {}).items() if k != "data"})
    return AdapterRouteNode(decl.name, decl.span, method.name, base, tuple(names),
                            tuple(tuple(samples) for _, samples in adapters if samples is not None),
                            tuple(sorted(kept.items())), data, checker.nodes[base].arch)


def _base(checker, decl: ast.Decl, body: ast.MapValue) -> str | None:
    return checker.required_model_ref(body, "base", f"route `{decl.name}` needs `base:`", decl.name_span,
                                      "name the model the adapters were trained on, e.g. `base: smol`", "base model")


def _adapters(checker, decl: ast.Decl, body: ast.MapValue, method) -> list[tuple[str, list | None]] | None:
    """(adapter name, its samples or None) for each input, in order."""
    entry = body.get("inputs")
    if entry is None:
        checker.problems.append(error("E014", f"route `{decl.name}` needs `inputs:`, the lora bricks to route "
                                      "between", decl.name_span, INPUTS_HELP[method.name]))
        return None
    value = entry.value
    if isinstance(value, ast.MapValue):
        pairs = [(ast.Ref(e.key, (), e.key_span, e.key_span), e.value) for e in value.entries]
    elif isinstance(value, ast.ListValue) and method is not Retrieve:
        pairs = [(item, None) for item in value.items]
    else:
        checker.problems.append(error("E033", f"`inputs` must be a map of lora bricks{' or a list' if method is not Retrieve else ''}"
                                      f", not {ast.describe(value)}", value.span, INPUTS_HELP[method.name]))
        return None
    if len(pairs) < 2:
        checker.problems.append(error("E032", "route between at least two lora bricks", value.span,
                                      INPUTS_HELP[method.name]))
        return None
    adapters = []
    for ref, params in pairs:
        name = adapter_ref(checker, ref, "route input")
        samples = None
        if method is Retrieve:
            validated = checker.input_params(method, params, {}, ref.span)
            samples = None if validated is None else validated["samples"]
        elif params is not None:
            checker.problems.append(error("E013", "gate inputs take no parameters", params.span,
                                          INPUTS_HELP["gate"]))
        if name is not None and (samples is not None or method is not Retrieve):
            adapters.append((name, samples))
    return adapters if len(adapters) == len(pairs) else None


def _same_base(checker, body: ast.MapValue, names: list[str], base: str) -> bool:
    for name in names:
        trained_on = checker.nodes[name].base
        if trained_on != base:
            checker.problems.append(error(
                "E155", f"lora brick `{name}` belongs to `{trained_on}`, but the route's base is `{base}`",
                body.get("base").value.span, "route between adapters of the base they were trained on"))
            return False
    return True


def _enough(checker, body: ast.MapValue, options: dict, count: int, layers: int) -> bool:
    """top_k within the adapters routed, embed_layers within the base's layers (E159)."""
    if options["top_k"] > count:
        where = body.get("top_k") or body.get("method")
        checker.problems.append(error("E159", f"`top_k: {options['top_k']}` exceeds the {count} adapters routed",
                                      where.value.span, f"choose top_k between 1 and {count}"))
        return False
    embed_layers = options.get("embed_layers")
    if embed_layers is not None and layers and embed_layers > layers:
        checker.problems.append(error("E159", f"`embed_layers: {embed_layers}` exceeds the base's {layers} layers",
                                      body.get("embed_layers").value.span,
                                      f"choose embed_layers between 1 and {layers}, or leave it out (all)"))
        return False
    return True


def _training_text(checker, body: ast.MapValue, options: dict, base_dir: Path) -> str | None | bool:
    """The resolved path of the gate's training text, None without training, False
    after reporting a file that cannot be read."""
    training = options.get("train")
    if not training:
        return None
    path = base_dir / training["data"]
    try:
        read_texts(path)
    except DataError as exc:
        train = body.get("train").value
        where = train.get("data").value.span if isinstance(train, ast.MapValue) and train.get("data") else train.span
        checker.problems.append(error("E153", f"cannot read the gate's training data `{training['data']}`: {exc}",
                                      where, 'a text file, or .jsonl with one {"text": ...} a line; paths are '
                                      "relative to the .brick file"))
        return False
    return str(path.resolve())
