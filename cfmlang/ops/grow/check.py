"""Check `grow` statements: bind the input model(s), validate the method's parameters,
and compute the grown model's architecture (layers, tensors, sizes) from the input's,
without reading a weight. Part of the check stage (called by check.py)."""
from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from pydantic import Field

from cfmlang.frontend import ast
from cfmlang.architectures import upcycled
from cfmlang.compiler.ir import ArchInfo, GrowNode, LayerSource, TensorSpec
from cfmlang.diagnostics import error, warning
from cfmlang.ops.grow.prompt_gates import PROMPTED_MODES
from cfmlang.ops.registry import Gradient, Params
from cfmlang.ops.grow.shapes import (FFN_ROLES, cast_spec, depth_origins, every_positions, expanded_layers,
                                     missing_output_projections, sliced_layers, upcycled_specs, widened_spec)

GROW_KEYS = ("method", "from", "seed", "description")


class Slice(Params):
    """Per-slice parameters of `stack`, mergekit's passthrough parameters."""

    scale: Gradient | None = None


class Expert(Params):
    """Per-expert parameters of `moe`, mergekit-moe's names."""

    positive_prompts: list[str] = []
    negative_prompts: list[str] = []
    noise_scale: Annotated[float, Field(ge=0)] | None = None
    residual_scale: float | None = None



class _ExpertInputs:
    """What `checker.merge_inputs` binds moe's `inputs:` with."""

    Input = Expert
STACK_KEYS = ("method", "slices", "seed", "description")
MOE_KEYS = ("method", "base", "inputs", "seed", "description")
UPCYCLE_TYPES = ("llama", "mistral")


def check_grow(checker, decl: ast.Decl, body: ast.MapValue, method) -> GrowNode | None:
    """The GrowNode of `decl` (planned by the method's `plan`), or None after reporting
    why it cannot be built."""
    keys = method.keys
    option_names = [f.alias or n for n, f in method.Options.model_fields.items()]
    checker.unknown_keys(body, keys + tuple(option_names), f"grow `{decl.name}` (method {method.name})")
    before = len(checker.problems)
    entries = tuple(e for e in body.entries if e.key in option_names)
    options = checker.validate(method.Options, ast.MapValue(entries, body.span), body.span)
    seed = checker.seed(body.get("seed").value) if body.get("seed") else None
    planned = None if options is None else method.plan(checker, decl, body, options)
    if planned is None or options is None or any(p.is_error for p in checker.problems[before:]):
        return None
    inputs, layers, arch, *expert_specs = planned
    tolerance = options["tolerance"] if options["verify"] == "identity" else None
    kept = tuple(sorted([(k, v) for k, v in options.items() if k not in ("verify", "tolerance")]
                        + [("experts", specs) for specs in expert_specs]))
    return GrowNode(decl.name, decl.span, method.name, inputs, layers, kept, tolerance, seed, arch)


def _from(checker, decl: ast.Decl, body: ast.MapValue, key: str = "from") -> str | None:
    return checker.required_model_ref(body, key, f"`grow {decl.name}` needs `{key}:`", decl.name_span,
                                      f"name the model to grow, e.g. `{key}: base`", "model to grow")


# ---- block_expand ---------------------------------------------------------------------

def _block_expand(checker, decl, body, options, source: str):
    arch = checker.nodes[source].arch
    positions = _positions(checker, decl, body, options, arch.num_layers)
    layout = checker.layout_of(source, "block_expand", body.get("method").value.span)
    if positions is None or layout is None:
        return None
    missing = [(p, what) for p in sorted(set(positions))
               for what in missing_output_projections(list(arch.tensors), p, layout)] if arch.tensors else []
    if missing:
        layer, what = missing[0]
        checker.problems.append(error(
            "E113", f"block_expand cannot zero the {what} of layer {layer} of `{source}`: "
            "no such tensor", body.get("method").value.span,
            "a new block is the identity only when every projection that writes into the residual "
            f"stream is zeroed; `{source}` ({arch.model_type}) lacks one"))
        return None
    layers = expanded_layers(source, arch.num_layers, positions)
    return (source,), layers, depth_arch(arch, layers, {source: list(arch.tensors)})


def _positions(checker, decl, body, options, num_layers: int) -> list[int] | None:
    every, positions = options["every"], options["positions"]
    if (every is None) == (positions is None):
        where = body.get("positions") or body.get("method")
        checker.problems.append(error(
            "E115", "block_expand needs exactly one of `every:` and `positions:`"
            + (", not both" if every is not None else ""), where.value.span if where.key != "positions"
            else where.key_span, "`every: 4` adds a block after every 4th layer; `positions: [3, 7]` "
            "adds copies of layers 3 and 7 right after them"))
        return None
    if every is not None:
        if every > num_layers:
            checker.problems.append(error(
                "E111", f"`every: {every}` adds no block to a model of {num_layers} layers",
                body.get("every").value.span, f"use at most `every: {num_layers}`"))
            return None
        if num_layers % every:
            checker.problems.append(warning(
                "W011", f"{num_layers} layers are not a multiple of `every: {every}`: the last "
                f"{num_layers % every} get no new block after them", body.get("every").value.span,
                "choose a divisor of the layer count, or list `positions:`"))
        return every_positions(num_layers, every)
    return _checked_positions(checker, body.get("positions").value, positions, num_layers)


def _checked_positions(checker, value: ast.ListValue, positions: list[int], num_layers: int) -> list[int] | None:
    ok = bool(positions)
    if not positions:
        checker.problems.append(error("E111", "`positions` is empty", value.span,
                                      "list the layers to copy, e.g. `positions: [3, 7]`"))
    seen: set[int] = set()
    for item, position in zip(value.items, positions):
        if position >= num_layers:
            ok = False
            checker.problems.append(error(
                "E111", f"position {position} is out of range: the model has {num_layers} layers "
                f"(0 to {num_layers - 1})", item.span, "a position is the layer copied and inserted after itself"))
        elif position in seen:
            ok = False
            checker.problems.append(error("E111", f"position {position} is given twice", item.span,
                                          "each layer is copied at most once"))
        seen.add(position)
    return positions if ok else None


def depth_arch(arch: ArchInfo, layers: tuple[LayerSource, ...],
                specs_of: dict[str, list[TensorSpec]]) -> ArchInfo:
    tensors = tuple(spec for spec, _ in depth_origins(layers, specs_of, arch.layout).values()) if arch.tensors \
        else ()
    new = tuple(i for i, layer in enumerate(layers) if layer.new)
    layout = replace(arch.layout, num_layers=len(layers))
    return replace(arch, num_layers=len(layers), tensors=tensors, new_layers=new, layout=layout)


# ---- stack ------------------------------------------------------------------------------

def plan_stack(checker, decl, body, options):
    entry = body.get("slices")
    if entry is None:
        checker.problems.append(error("E014", f"`grow {decl.name}` (stack) needs `slices:`", decl.name_span,
                                      "e.g. `slices: [a.layers[0:24], b.layers[8:32]]`"))
        return None
    if not isinstance(entry.value, ast.ListValue) or not entry.value.items:
        checker.problems.append(error(
            "E032" if isinstance(entry.value, ast.ListValue) else "E033",
            f"`slices` must be a non-empty list of layer selections, not {ast.describe(entry.value)}",
            entry.value.span, "e.g. `slices: [a.layers[0:24], b.layers[8:32]]`"))
        return None
    slices = [_slice(checker, item) for item in entry.value.items]
    if None in slices:
        return None
    first = checker.nodes[slices[0][0]].arch
    if checker.layout_of(slices[0][0], "stack", entry.value.items[0].span) is None:
        return None
    for (model, _, _, _), item in zip(slices[1:], entry.value.items[1:]):
        if not _stackable(checker, slices[0][0], first, model, checker.nodes[model].arch, item.span):
            return None
    layers = tuple(layer for model, start, stop, params in slices
                   for layer in sliced_layers(model, start, stop, params))
    inputs = tuple(dict.fromkeys(model for model, *_ in slices))
    specs_of = {m: list(checker.nodes[m].arch.tensors) for m in inputs}
    arch = depth_arch(first, layers, specs_of)
    arch = replace(arch, tensors=tuple(cast_spec(spec, options["dtype"]) for spec in arch.tensors))
    if not all(specs_of.values()):
        arch = replace(arch, tensors=())
    return inputs, layers, arch


def _slice(checker, item: ast.Value):
    """(model, start, stop, per-slice parameters) of one `slices` item, or None."""
    params = {}
    if isinstance(item, ast.MapValue):
        ref_entry = item.get("from")
        if ref_entry is None:
            checker.problems.append(error("E014", "a slice map needs `from:`", item.span,
                                          "e.g. `{from: b.layers[8:32], scale: 0.5}`"))
            return None
        rest = ast.MapValue(tuple(e for e in item.entries if e.key != "from"), item.span)
        params = checker.validate(Slice, rest, item.span)
        if params is None:
            return None
        item = ref_entry.value
    if not isinstance(item, ast.Ref):
        checker.problems.append(error("E114", f"a slice must select layers of a model, not {ast.describe(item)}",
                                      item.span, "e.g. `a.layers[0:24]`, or `{from: a.layers[0:24], scale: 0.5}`"))
        return None
    model = _slice_model(checker, item)
    if model is None:
        return None
    bounds = _slice_bounds(checker, item, checker.nodes[model].arch.num_layers)
    if bounds is None:
        return None
    kept = tuple(sorted((k, v) for k, v in params.items() if v is not None))
    return model, bounds[0], bounds[1], kept


def _slice_model(checker, ref: ast.Ref) -> str | None:
    if ref.name not in checker.table:
        plain = ast.Ref(ref.name, (), ref.name_span, ref.name_span)
        return checker.model_ref_value(plain, "slice")   # reports E020 with a did-you-mean
    node = checker.nodes.get(ref.name)
    if node is None:
        return None
    if node.node_type != "model":
        checker.problems.append(error("E021", f"`{ref.name}` is {node.node_type}, but a slice must "
                                      "select layers of a model", ref.span))
        return None
    return ref.name


def _slice_bounds(checker, ref: ast.Ref, num_layers: int) -> tuple[int, int] | None:
    accessors = ref.accessors
    if not accessors:
        return 0, num_layers
    shape_ok = isinstance(accessors[0], ast.Attr) and accessors[0].name == "layers" and \
        (len(accessors) == 1 or (len(accessors) == 2 and isinstance(accessors[1], ast.Index)))
    if not shape_ok:
        checker.problems.append(error("E114", f"`{ref.text()}` is not a range of layers", ref.span,
                                      f"select whole layers: `{ref.name}.layers[0:{num_layers}]`"))
        return None
    if len(accessors) == 1 or accessors[1].every:
        return 0, num_layers
    index = accessors[1]
    start = index.start if index.start is not None else 0
    stop = (index.stop if index.stop is not None else num_layers) if index.is_slice else start + 1
    if start < 0 or stop > num_layers or start >= stop:
        checker.problems.append(error(
            "E111", f"`{ref.text()}` selects no layers or layers out of range: `{ref.name}` has "
            f"{num_layers} layers (0 to {num_layers - 1})", index.span,
            "a slice [start:stop] needs 0 <= start < stop <= the layer count (no negative indices)"))
        return None
    return start, stop


def _stackable(checker, first_name, first: ArchInfo, name, arch: ArchInfo, span) -> bool:
    for what in ("model_type", "hidden_size", "vocab_size", "intermediate_size"):
        a, b = getattr(first, what), getattr(arch, what)
        if a != b:
            checker.problems.append(error("E114", f"cannot stack layers of `{first_name}` and `{name}`: "
                                          f"{what} {a} != {b}", span,
                                          "stacked slices must come from models of one architecture"))
            return False
    mine, theirs = _layer_shapes(first), _layer_shapes(arch)
    if mine and theirs and mine != theirs:
        differing = sorted(set(mine.items()) ^ set(theirs.items()))[0][0]
        checker.problems.append(error("E114", f"cannot stack layers of `{first_name}` and `{name}`: their "
                                      f"layers differ in `{differing}`", span,
                                      "stacked slices must come from models of one architecture"))
        return False
    return True


def _layer_shapes(arch: ArchInfo) -> dict[str, tuple[int, ...]]:
    """Shapes of layer 0's tensors, by name within the layer."""
    prefix = arch.layout.layer_prefix(0)
    return {s.name.removeprefix(prefix): s.shape for s in arch.tensors if arch.layer_of(s.name) == 0}


# ---- widen and upcycle ----------------------------------------------------------------------

MAX_OUTPUT_TENSORS = 1_000_000
"""The most tensors a grown model may hold (the largest released MoE models hold some
50,000): a bound that keeps checking and planning an absurd `experts:` short."""


WIDENED_ROLES = ("ffn.up", "ffn.down")
"""What widen needs: an FFN whose neurons are rows of its input projections (the gate's
too, where there is one) and columns of its output projection, stored `[out, in]`."""


def _mlp_problem(checker, arch: ArchInfo, source: str, method: str, span, roles=FFN_ROLES) -> bool:
    """Report (E113) a layer without the FFN projections `roles` (gated: separate gate,
    up and down projections); True when one is missing."""
    layout = arch.layout
    what = "a gated FFN (separate gate, up and down projections)" if roles == FFN_ROLES else \
        "an FFN with separate input and output projections"
    if not all(layout.member(role) for role in roles) or layout.member("ffn.gate_up") or layout.transposed:
        lacking = layout.lacking(f"{method} needs {what}")
        if layout.transposed:
            lacking = (f"{method} needs {what} stored `[out, in]`, but {layout.model_type} models store theirs "
                       "transposed (GPT-2's Conv1D layers)")
        checker.problems.append(error(
            "E113", lacking, span, f"{method} works on the families marked `yes` in docs/architectures.md"))
        return True
    names = {s.name for s in arch.tensors}
    for layer in range(arch.num_layers) if names else ():
        absent = [layout.module(layer, role) + ".weight" for role in roles
                  if layout.module(layer, role) + ".weight" not in names]
        if absent:
            checker.problems.append(error(
                "E113", f"{method} needs {what}, but layer {layer} of `{source}` has no `{absent[0]}`", span,
                f"{method} works on the families marked `yes` in docs/architectures.md"))
            return True
    return False


def _widen(checker, decl, body, options, source: str):
    arch = checker.nodes[source].arch
    size = options["intermediate_size"]
    if size <= arch.intermediate_size:
        checker.problems.append(error(
            "E112", f"`intermediate_size: {size}` does not widen `{source}`, whose FFN already has "
            f"{arch.intermediate_size} neurons", body.get("intermediate_size").value.span,
            f"give a size larger than {arch.intermediate_size}"))
        return None
    if checker.layout_of(source, "widen", body.get("method").value.span) is None or \
            _mlp_problem(checker, arch, source, "widen", body.get("method").value.span, WIDENED_ROLES):
        return None
    tensors = tuple(widened_spec(s, size, arch.layout) for s in arch.tensors)
    return (source,), (), replace(arch, intermediate_size=size, tensors=tensors)


def _upcycle(checker, decl, body, options, source: str):
    arch = checker.nodes[source].arch
    method_span = body.get("method").value.span
    if options["top_k"] > options["experts"]:
        checker.problems.append(error(
            "E116", f"`top_k: {options['top_k']}` exceeds `experts: {options['experts']}`",
            body.get("top_k").value.span, "route each token to at most as many experts as there are"))
        return None
    if arch.model_type not in UPCYCLE_TYPES:
        checker.problems.append(error(
            "E113", f"upcycle writes a Mixtral model, which cannot hold the attention of `{source}` "
            f"(model_type `{arch.model_type}`)", method_span,
            f"upcycle supports {' and '.join(UPCYCLE_TYPES)} models"))
        return None
    if checker.layout_of(source, "upcycle", method_span) is None or \
            _mlp_problem(checker, arch, source, "upcycle", method_span):
        return None
    biased = next((s.name for s in arch.tensors if arch.layer_of(s.name) is not None
                   and s.name.endswith(".bias")), None)
    if biased:
        checker.problems.append(error(
            "E113", f"upcycle writes a Mixtral model, which has no biases, but `{source}` has `{biased}`",
            method_span, "upcycle supports bias-free Llama and Mistral models"))
        return None
    count = len(arch.tensors) + arch.num_layers * (1 + len(FFN_ROLES) * options["experts"])
    if count > MAX_OUTPUT_TENSORS:
        checker.problems.append(error(
            "E310", f"`experts: {options['experts']}` would write {count:,} tensors ({options['experts']:,} "
            f"copies of each of the {arch.num_layers} layers' FFN); a model holds at most "
            f"{MAX_OUTPUT_TENSORS:,}", body.get("experts").value.span,
            "upcycled models have a handful of experts per layer (Mixtral: 8)"))
        return None
    tensors = tuple(spec for spec, _ in upcycled_specs(list(arch.tensors), options["experts"], arch.layout).values())
    return (source,), (), replace(arch, model_type="mixtral", tensors=tensors,
                                 layout=upcycled(arch.layout, options["experts"]))


def _from_source(plan):
    """A plan of one input model named by `from:`."""
    def planned(checker, decl, body, options):
        source = _from(checker, decl, body)
        return None if source is None else plan(checker, decl, body, options, source)
    return planned


plan_block_expand = _from_source(_block_expand)
plan_widen = _from_source(_widen)
plan_upcycle = _from_source(_upcycle)


# ---- moe: experts from fine-tunes -----------------------------------------------------------

def plan_moe(checker, decl, body, options):
    """(inputs: base first then each expert model once, (), Mixtral arch, experts) where
    experts is ((model, positive prompts, negative prompts, noise_scale, residual_scale), ...)."""
    base = _from(checker, decl, body, key="base")
    if body.get("inputs") is None:
        checker.problems.append(error(
            "E014", f"`grow {decl.name}` needs `inputs:`, the expert models", decl.name_span,
            "e.g. `inputs: {math: {positive_prompts: [\"solve 2x + 3 = 7\"]}, code: {...}}`"))
        return None
    experts = checker.merge_inputs(decl, body, _ExpertInputs, {})
    if base is None or experts is None:
        return None
    method_span = body.get("method").value.span
    if options["experts_per_token"] > len(experts):
        where = body.get("experts_per_token")
        checker.problems.append(error(
            "E116", f"`experts_per_token: {options['experts_per_token']}` exceeds the {len(experts)} "
            "experts", where.value.span if where else method_span,
            "route each token to at most as many experts as there are"))
        return None
    if options["gate_mode"] in PROMPTED_MODES:
        unprompted = next((e for e in experts if not dict(e.params)["positive_prompts"]), None)
        if unprompted is not None:
            checker.problems.append(error(
                "E117", f"expert `{unprompted.model}` has no `positive_prompts`, which gate_mode "
                f"`{options['gate_mode']}` builds its router from", unprompted.span,
                "give a few prompts that should be routed to it, or use `gate_mode: random`"))
            return None
    models = list(dict.fromkeys([base] + [e.model for e in experts]))
    arch = checker.compatible(decl, models)
    if arch is None:
        return None
    planned = _upcycle(checker, decl, body, {"experts": len(experts), "top_k": options["experts_per_token"]}, base)
    if planned is None:
        return None
    spec = tuple((e.model, tuple(dict(e.params)["positive_prompts"]), tuple(dict(e.params)["negative_prompts"]),
                  dict(e.params)["noise_scale"], dict(e.params)["residual_scale"]) for e in experts)
    return tuple(models), (), planned[2], spec
