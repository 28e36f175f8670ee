"""Checking `brick ... kind: experts` and `route ... method: topk` (part of the check stage).

Both take the checker to report into; they return the IR node, or None after reporting.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cfmlang.analysis.probes import read_probes
from cfmlang.frontend import ast
from cfmlang.compiler.ir import ArchInfo, Calibration, ExpertsNode, RouteNode
from cfmlang.frontend.resolve import Declared
from cfmlang.diagnostics import CompileError, error
from cfmlang.io.datafile import MAX_DATA_BYTES

EXPERTS_KEYS = ("kind", "from", "description")
ROUTE_KEYS = ("method", "experts", "description")
FFN_SELECTOR_HELP = "select FFNs as `m.layers[*].mlp`, `m.layers[3].mlp` or `m.layers[0:12].mlp`"
FFN_ROLES = ("ffn.gate", "ffn.up", "ffn.down")
"""A gated FFN: separate gate, up and down projections."""
SHIPPED_PROBES = "probes"     # `calibration: probes`: the shipped probe prompts as calibration text


def check_experts(checker, declared: Declared, body: ast.MapValue, kind) -> ExpertsNode | None:
    decl = declared.decl
    fields = tuple(kind.Options.model_fields)
    checker.unknown_keys(body, EXPERTS_KEYS + fields, f"brick `{decl.name}` (kind experts)")
    selection = ffn_selection(checker, body.get("from"), decl)
    options = checker.validate(kind.Options, _options_map(body, fields), body.span)
    if options is None or selection is None:
        return None
    model, layers = selection
    arch = checker.nodes[model].arch
    calibration = probes_of(checker, options, body, declared.base_dir) if options["split"] == "functional" \
        else calibration_of(checker, options, body, declared.base_dir)
    if not gated_ffns(checker, arch, model, layers, body.get("from").value.span) or \
            not divides(checker, arch, options["count"], body.get("count").value.span) or calibration is None:
        return None
    return ExpertsNode(decl.name, decl.span, model, layers, options["split"], options["count"],
                       options["seed"], calibration, arch)


def check_route(checker, declared: Declared, body: ast.MapValue, method) -> RouteNode | None:
    decl = declared.decl
    fields = tuple(method.Options.model_fields)
    checker.unknown_keys(body, ROUTE_KEYS + fields, f"route `{decl.name}` (method {method.name})")
    experts = experts_ref(checker, body.get("experts"), decl)
    options = checker.validate(method.Options, _options_map(body, fields), body.span)
    if options is None or experts is None:
        return None
    calibration = calibration_of(checker, options, body, declared.base_dir)
    count = experts.count
    if options["k"] > count:
        checker.problems.append(error(
            "E167", f"k = {options['k']} but `{experts.name}` has only {count} experts",
            body.get("k").value.span, f"choose k between 1 and {count} (k = {count} is the dense model)"))
        return None
    if calibration is None:
        return None
    return RouteNode(decl.name, decl.span, method.name, experts.name, options["router"], options["k"],
                     options["epochs"], options["seed"], calibration, experts.arch)


def _options_map(body: ast.MapValue, fields: tuple[str, ...]) -> ast.MapValue:
    return ast.MapValue(tuple(e for e in body.entries if e.key in fields), body.span)


def ffn_selection(checker, entry: ast.Entry | None, decl: ast.Decl) -> tuple[str, tuple[int, ...]] | None:
    """(model name, layer indices) of `from: m.layers[...].mlp`."""
    if entry is None:
        checker.problems.append(error("E014", f"brick `{decl.name}` (kind experts) needs `from:`",
                                      decl.name_span, "e.g. `from: base.layers[*].mlp`"))
        return None
    value = entry.value
    if not isinstance(value, ast.Ref):
        checker.problems.append(error("E033", f"`from` must select FFNs of a model, not {ast.describe(value)}",
                                      value.span, FFN_SELECTOR_HELP))
        return None
    node = _declared_node(checker, value)
    if node is None:
        return None
    if node.node_type != "model":
        checker.problems.append(error("E021", f"`{value.name}` is {_article(node.node_type)}, but `from` "
                                      "must select the FFNs of a model", value.name_span, FFN_SELECTOR_HELP))
        return None
    accessors = value.accessors
    shape_ok = (len(accessors) == 3 and isinstance(accessors[0], ast.Attr) and accessors[0].name == "layers"
                and isinstance(accessors[1], ast.Index) and isinstance(accessors[2], ast.Attr)
                and accessors[2].name == "mlp")
    if not shape_ok:
        checker.problems.append(error("E168", f"`{value.text()}` does not select FFN blocks", value.span,
                                      FFN_SELECTOR_HELP))
        return None
    layers = selected_layers(accessors[1], node.arch.num_layers)
    if not layers:
        checker.problems.append(error(
            "E168", f"`{value.text()}` selects no layer: `{value.name}` has layers 0 to "
            f"{node.arch.num_layers - 1}", accessors[1].span, FFN_SELECTOR_HELP))
        return None
    return value.name, layers


def selected_layers(index: ast.Index, num_layers: int) -> tuple[int, ...]:
    if index.every:
        return tuple(range(num_layers))
    if not index.is_slice:
        return (index.start,) if 0 <= index.start < num_layers else ()
    start = 0 if index.start is None else index.start
    stop = num_layers if index.stop is None else index.stop
    if not 0 <= start < stop <= num_layers:
        return ()
    return tuple(range(start, stop))


def experts_ref(checker, entry: ast.Entry | None, decl: ast.Decl) -> ExpertsNode | None:
    hint = "e.g. `brick e: {kind: experts, from: m.layers[*].mlp, split: kmeans, count: 8}`, then `experts: e`"
    if entry is None:
        checker.problems.append(error("E014", f"route `{decl.name}` needs `experts:`", decl.name_span, hint))
        return None
    value = entry.value
    if not (isinstance(value, ast.Ref) and value.is_plain):
        checker.problems.append(error("E033", f"`experts` must name an experts brick, not {ast.describe(value)}",
                                      value.span, hint))
        return None
    node = _declared_node(checker, value)
    if node is None:
        return None
    if node.node_type != "experts":
        checker.problems.append(error("E021", f"`{value.name}` is {_article(node.node_type)}, but `experts` "
                                      "must name an experts brick", value.span, hint))
        return None
    return node


def _declared_node(checker, value: ast.Ref):
    """The checked node `value` names; None (reported when undeclared) otherwise."""
    if not checker.declared(value, "declare it first"):
        return None
    return checker.nodes.get(value.name)   # None: its declaration failed and was reported


def _article(node_type: str) -> str:
    return ("an " if node_type[0] in "aeiou" else "a ") + node_type


def gated_ffns(checker, arch: ArchInfo, model: str, layers: tuple[int, ...], span) -> bool:
    """Every selected layer has a gated FFN (gate, up, down projections) without biases."""
    if not arch.tensors:
        return True   # pickled checkpoints: the executor checks while loading
    layout = checker.layout_of(model, "an experts brick", span)
    if layout is None:
        return False
    names = {t.name for t in arch.tensors}
    if not layout.gated_ffn:
        checker.problems.append(error(
            "E165", layout.lacking(f"experts split the neurons of a gated FFN (separate gate, up and down "
                                   f"projections) of `{model}`"), span,
            "experts need gated FFNs without biases (Llama, Mistral, Qwen2 style; see docs/architectures.md)"))
        return False
    for layer in layers:
        wanted = [layout.module(layer, role) + ".weight" if layout.member(role) else f"{role} of layer {layer}"
                  for role in FFN_ROLES]
        missing = [name for name in wanted if name not in names]
        biased = [n for n in names if layout.layer_of(n) == layer and layout.role_of(n) in FFN_ROLES
                  and n.endswith(".bias")]
        if missing or biased:
            what = f"has no `{missing[0]}`" if missing else f"has a bias `{biased[0]}`"
            checker.problems.append(error(
                "E165", f"layer {layer} of `{model}` ({layout.model_type}) {what}", span,
                "experts need gated FFNs without biases (gate_proj, up_proj, down_proj: "
                "Llama, Mistral, Qwen2 style)"))
            return False
    return True


def divides(checker, arch: ArchInfo, count: int, span) -> bool:
    width = arch.intermediate_size
    if width % count == 0:
        return True
    options = [d for d in range(2, min(width, 256) + 1) if width % d == 0]
    checker.problems.append(error(
        "E166", f"{width} FFN neurons cannot form {count} equal experts", span,
        f"choose a count that divides {width}, e.g. {', '.join(map(str, options[:8]))}"))
    return False


def probes_of(checker, options: dict, body: ast.MapValue, base_dir: Path) -> Calibration | None:
    """The probe directory of a functional split (None: the shipped probe sets), read now
    so that a bad probe set is reported at its `calibration:` entry."""
    given = options["calibration"]
    span = body.get("calibration").value.span if given is not None else body.get("split").value.span
    if isinstance(given, dict):
        checker.problems.append(error("E169", "`split: functional` needs prompts labelled by ability, not "
                                      "generated text", span, "name a probe directory (one ABILITY.txt per "
                                      "ability), or leave `calibration` out for the shipped probe sets"))
        return None
    folder = None if given in (None, SHIPPED_PROBES) else (base_dir / given).resolve()
    try:
        _, warnings = read_probes(folder)
    except CompileError as exc:
        checker.problems += [replace(d, span=span) for d in exc.diagnostics]
        return None
    checker.problems += [replace(d, span=span) for d in warnings]
    return Calibration(None if folder is None else str(folder), options["calibration_tokens"], "probes")


def calibration_of(checker, options: dict, body: ast.MapValue, base_dir: Path) -> Calibration | None:
    given, tokens = options["calibration"], options["calibration_tokens"]
    if given is None:
        return Calibration(None, tokens, "corpus")
    if isinstance(given, dict):
        return Calibration(None, given["generate"], "generated")
    if given == SHIPPED_PROBES:
        return Calibration(None, tokens, "probes")
    path = (base_dir / given).resolve()
    if not path.is_file():
        checker.problems.append(error("E169", f"calibration text `{given}` not found", body.get("calibration").value.span,
                                      "give a UTF-8 text file (relative to this .brick file), `probes` "
                                      "(the shipped probe prompts), `{generate: N}`, or leave "
                                      "`calibration` out to use the shipped corpus"))
        return None
    if path.stat().st_size > MAX_DATA_BYTES:
        checker.problems.append(error("E169", f"calibration text `{given}` holds more than {MAX_DATA_BYTES >> 20} MiB",
                                      body.get("calibration").value.span,
                                      "calibration reads the file whole; give a sample of it"))
        return None
    return Calibration(str(path), tokens)
