"""Checking customized bricks: LoRA bricks (PEFT sources, training, extraction), models
with adapters attached (`model NAME: {from: MODEL, attach: [ADAPTER, ...]}`) and merges
over LoRA bricks. A mixin of the checker: it uses the checker's problems, nodes, table
and helpers (validate, unknown_keys, model_ref, seed, compatible)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from cfmlang.frontend import ast
from cfmlang.ops.lora.peft_dirs import adapter_modules, base_modules, fit_problem, read_peft_dir
from cfmlang.compiler.ir import (AttachNode, LoraExtractNode, LoraMergeNode, LoraModuleSpec, LoraSourceNode,
                                 LoraTrainNode, MergeInput, ModelNode, Source, TrainData)
from cfmlang.io.datafile import read_data_bytes
from cfmlang.io.sources import SourceError
from cfmlang.diagnostics import did_you_mean, error, warning
from cfmlang.ops.registry import lookup, names_for
from cfmlang.ops.lora.factors import EXTRACTED_ROLES, TRAINED_ROLES, TrainOptions, default_targets, module_order, peft_rank
from cfmlang.ops.lora.combine import ADAPTER_MERGE, NEEDS_DENSITY, SAME_RANK, CombineOptions, merged_rank
from cfmlang.ops.lora.train import DataError, read_samples

LORA_KEYS = ("kind", "extract", "source", "base", "train", "description")
ORIGINS = ("source", "train", "extract")
ATTACH_KEYS = ("from", "attach", "description")
ADAPTER_MERGE_KEYS = ("method", "inputs", "seed", "description", "weight") + tuple(CombineOptions.model_fields)


class CombineNodeOptions(CombineOptions):
    weight: float | None = None        # a default for every input


# ---- lora bricks ----------------------------------------------------------------
def check_lora(checker, decl: ast.Decl, body: ast.MapValue, kind, base_dir: Path) -> None:
    checker.unknown_keys(body, LORA_KEYS, f"brick `{decl.name}` (kind lora)")
    given = [body.get(k) for k in ORIGINS if body.get(k) is not None]
    if len(given) != 1:
        checker.problems.append(error(
            "E157", f"lora brick `{decl.name}` needs exactly one of `source:`, `train:`, `extract:`"
            + (f", got {len(given)}" if given else ""), (given[1].key_span if given else decl.name_span),
            'read one with `source: peft "dir"`, train one with `train: {data: "file.jsonl"}`, '
            "or extract one with `extract: {from: tuned, base: base, rank: 16}`"))
        return
    origin = given[0]
    if origin.key == "extract":
        if body.get("base") is not None:
            checker.problems.append(error("E013", "an extracted lora brick names its base inside `extract:`",
                                       body.get("base").key_span, "move `base:` into `extract:`"))
            return
        check_lora_extract(checker, decl, origin, kind)
        return
    if body.get("base") is None:
        checker.problems.append(error("E014", f"lora brick `{decl.name}` needs `base:`", decl.name_span,
                                   "name the model the adapter belongs to, e.g. `base: smol`"))
        return
    base = checker.model_ref(body.get("base"), "base")
    if origin.key == "source":
        check_lora_source(checker, decl, origin, base, base_dir)
    else:
        check_lora_train(checker, decl, origin, base, base_dir)

def check_lora_source(checker, decl, entry: ast.Entry, base: str | None, base_dir: Path) -> None:
    value = entry.value
    if not isinstance(value, ast.Tagged) or value.tag != "peft":
        checker.problems.append(error(
            "E053", f"the source of a lora brick must be `peft \"dir\"`, not {ast.describe(value)}"
            + (f" `{value.tag}`" if isinstance(value, ast.Tagged) else ""),
            value.tag_span if isinstance(value, ast.Tagged) else value.span,
            'write `source: peft "path/to/adapter"` (a directory saved by PeftModel.save_pretrained)'))
        return
    path = Path(value.path) if Path(value.path).is_absolute() else (base_dir / value.path).resolve()
    if not path.exists():
        checker.problems.append(error("E050", f"`{value.path}` does not exist (looked in {path})", value.span,
                                   "paths are relative to the .brick file's directory"))
        return
    if base is None:
        return
    arch = checker.nodes[base].arch
    if refused_transposed(checker, arch, base, value.span):
        return
    try:
        config, specs = read_peft_dir(path)
        modules = adapter_modules(config, specs, arch, base)
    except SourceError as exc:
        checker.problems.append(exc.diagnostic(value.span))
        return
    if config.get("fan_in_fan_out"):
        checker.problems.append(warning(
            "W051", "the adapter sets `fan_in_fan_out`, but the base's projections are linear "
            "layers: it is ignored, as PEFT does", value.span,
            "fan_in_fan_out only applies to GPT-2-style Conv1D layers"))
    source = Source("peft", value.path, "peft", str(path))
    checker.nodes[decl.name] = LoraSourceNode(decl.name, decl.span, source, base, config, modules, arch)

def check_lora_train(checker, decl, entry: ast.Entry, base: str | None, base_dir: Path) -> None:
    spec = entry.value
    if not isinstance(spec, ast.MapValue):
        checker.problems.append(error("E033", f"`train` must be a map, not {ast.describe(spec)}", spec.span,
                                   'e.g. `train: {data: "data.jsonl", steps: 100, rank: 8}`'))
        return
    options = checker.validate(TrainOptions, spec, spec.span)
    if options is None:
        return
    data = train_data(checker, spec.get("data").value, options["data"], base_dir)
    if data is None or base is None or not has_tokenizer(checker, base, spec.span):
        return
    arch = checker.nodes[base].arch
    if refused_transposed(checker, arch, base, spec.span):
        return
    if options["targets"] is None:
        options["targets"] = default_targets(arch.layout, TRAINED_ROLES)
    modules = base_modules(arch, options["targets"], options["rank"])
    if not modules and arch.tensors:
        checker.problems.append(error("E150", f"no weight of `{base}` matches the targets "
                                   f"{options['targets']}", spec.get("targets").value.span
                                   if spec.get("targets") else spec.span,
                                   "targets are projection names such as q_proj, v_proj, up_proj"))
        return
    checker.nodes[decl.name] = LoraTrainNode(decl.name, decl.span, base, data,
                                          tuple(sorted(options.items())), modules, arch)

def refused_transposed(checker, arch, base: str, span) -> bool:
    """E280 for a base whose projections are stored transposed (GPT-2's Conv1D, `[in,
    out]`): adapter factors are read, trained, fused and extracted as `[out, in]`."""
    layout = arch.layout
    if layout is None or not layout.transposed:
        return False
    checker.problems.append(error(
        "E280", f"a lora brick on `{base}` needs linear projections stored `[out, in]`, but {layout.model_type} "
        "models store theirs transposed (GPT-2's Conv1D layers)", span,
        "LoRA bricks support the families whose projections are nn.Linear (see docs/architectures.md)"))
    return True


def has_tokenizer(checker, base: str, span) -> bool:
    """Training tokenizes its data with the base's tokenizer: a model directory must
    hold one (GGUF files embed theirs)."""
    node = checker.nodes[base]
    if not isinstance(node, ModelNode) or node.source.kind == "gguf":
        return True
    folder = Path(node.source.path) if node.source.kind == "hf" else Path(node.source.path).parent
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return True
    checker.problems.append(error("E158", f"`{base}` has no tokenizer to train with (looked in {folder})", span,
                               "save the tokenizer beside the model: tokenizer.save_pretrained(DIR)"))
    return False

def train_data(checker, value: ast.Value, given: str, base_dir: Path) -> TrainData | None:
    path = Path(given) if Path(given).is_absolute() else (base_dir / given).resolve()
    if not path.exists():
        checker.problems.append(error("E153", f"training data `{given}` does not exist (looked in {path})",
                                   value.span, "paths are relative to the .brick file's directory"))
        return None
    try:
        samples = read_samples(path)
    except DataError as exc:
        where = f"{path.name}:{exc.line}: " if exc.line else ""
        checker.problems.append(error("E153", f"bad training data: {where}{exc}", value.span,
                                   'a .txt file holds one text per line; a .jsonl file one '
                                   '{"text": ...} or {"prompt": ..., "response": ...} per line'))
        return None
    return TrainData(str(path), len(samples), hashlib.sha256(read_data_bytes(path)).hexdigest())

def check_lora_extract(checker, decl, extract: ast.Entry, kind) -> None:
    if not isinstance(extract.value, ast.MapValue):
        checker.problems.append(error("E033", f"`extract` must be a map, not {ast.describe(extract.value)}",
                                   extract.value.span, "e.g. `extract: {from: tuned, base: base, rank: 16}`"))
        return
    spec = extract.value
    refs = {}
    for role in ("from", "base"):
        entry = spec.get(role)
        if entry is None:
            checker.problems.append(error("E014", f"`extract` needs `{role}:`", spec.span,
                                       "name the fine-tuned model (`from`) and the model it was tuned from (`base`)"))
        else:
            refs[role] = checker.model_ref(entry, f"`{role}` model")
    numbers = ast.MapValue(tuple(e for e in spec.entries if e.key not in ("from", "base")), spec.span)
    options = checker.validate(kind.Extract, numbers, spec.span)
    if options is None or None in refs.values() or len(refs) < 2:
        return
    arch = checker.compatible(decl, [refs["base"], refs["from"]])
    if arch is None or refused_transposed(checker, arch, refs["base"], spec.span):
        return
    if options["targets"] is None:
        options["targets"] = default_targets(arch.layout, EXTRACTED_ROLES)
    modules = base_modules(arch, options["targets"], options["rank"])
    checker.nodes[decl.name] = LoraExtractNode(decl.name, decl.span, refs["from"], refs["base"],
                                            options["rank"], options["threshold"],
                                            tuple(options["targets"]), arch, modules)

# ---- adapters as inputs --------------------------------------------------------------
def is_adapter_decl(checker, name: str) -> bool:
    node = checker.nodes.get(name)
    if node is not None:
        return node.node_type == "adapter"
    declared = checker.table.get(name)
    if declared is None or declared.decl.keyword != "brick" or not isinstance(declared.decl.body, ast.MapValue):
        return False
    kind = declared.decl.body.get("kind")
    return kind is not None and isinstance(kind.value, ast.Ref) and kind.value.name == "lora"

def adapter_ref(checker, value: ast.Value, role: str) -> str | None:
    if not (isinstance(value, ast.Ref) and value.is_plain):
        checker.problems.append(error("E033", f"the {role} must name a lora brick, not {ast.describe(value)}",
                                   value.span))
        return None
    if not checker.declared(value, 'declare it, e.g. `brick NAME: {kind: lora, source: peft "dir", base: MODEL}`'):
        return None
    if not is_adapter_decl(checker, value.name):
        checker.problems.append(error("E154", f"`{value.name}` is not a lora brick, but the {role} must be one",
                                   value.span, "merge models with models and adapters with adapters; "
                                   "attach adapters to a model with `model NAME: {from: MODEL, attach: [...]}`"))
        return None
    return value.name if value.name in checker.nodes else None

# ---- models with adapters attached ---------------------------------------------------
def check_attach(checker, decl: ast.Decl, body: ast.MapValue) -> None:
    checker.unknown_keys(body, ATTACH_KEYS, f"model `{decl.name}` (with `from:`)")
    source, attach = body.get("from"), body.get("attach")
    if source is None or attach is None:
        missing = "from" if source is None else "attach"
        checker.problems.append(error(
            "E014", f"model `{decl.name}` needs `{missing}:` with `{'attach' if missing == 'from' else 'from'}:`",
            (attach or source).key_span,
            "a derived model is `from: MODEL` with `attach: [ADAPTER, ...]` fused into its weights"))
        return
    model = checker.model_ref(source, "`from` model")
    items = attach.value.items if isinstance(attach.value, ast.ListValue) else [attach.value]
    if not items:
        checker.problems.append(error("E032", "`attach` is empty", attach.value.span, "name at least one lora brick"))
        return
    adapters = [adapter_ref(checker, item, "attached brick") for item in items]
    if model is None or None in adapters:
        return
    arch = checker.nodes[model].arch
    for adapter, item in zip(adapters, items):
        problem = next((p for m in checker.nodes[adapter].modules if (p := fit_problem(m, arch, model))), None)
        if problem:
            checker.problems.append(error(*problem, item.span, f"`{adapter}` was made for a model of another shape"))
            return
    checker.nodes[decl.name] = AttachNode(decl.name, decl.span, model, tuple(adapters), arch)

# ---- merges over adapters -------------------------------------------------------------
def merges_adapters(checker, body: ast.MapValue) -> bool:
    entry = body.get("inputs")
    if entry is None:
        return False
    if isinstance(entry.value, ast.MapValue):
        names = [e.key for e in entry.value.entries]
    elif isinstance(entry.value, ast.ListValue):
        names = [i.name for i in entry.value.items if isinstance(i, ast.Ref)]
    else:
        return False
    return any(is_adapter_decl(checker, n) for n in names)

def check_adapter_merge(checker, decl: ast.Decl, body: ast.MapValue) -> None:
    method_entry = body.get("method")
    known = names_for(ADAPTER_MERGE)
    if method_entry is None:
        checker.problems.append(error("E014", f"`merge {decl.name}` needs a `method:`", decl.name_span,
                                   f"over lora bricks: one of {', '.join(known)}"))
        return
    value = method_entry.value
    if not (isinstance(value, ast.Ref) and value.is_plain and value.name in known):
        name = value.name if isinstance(value, ast.Ref) else ast.describe(value)
        checker.problems.append(error("E030", f"`{name}` is not a method for merging lora bricks", value.span,
                                   did_you_mean(str(name), known) or f"one of: {', '.join(known)}"))
        return
    method = lookup(ADAPTER_MERGE, value.name)
    checker.unknown_keys(body, ADAPTER_MERGE_KEYS, f"merge `{decl.name}` over lora bricks")
    before = len(checker.problems)
    node_options = [e for e in body.entries if e.key in CombineNodeOptions.model_fields]
    options = checker.validate(CombineNodeOptions, ast.MapValue(tuple(node_options), body.span), body.span)
    seed = checker.seed(body.get("seed").value) if body.get("seed") else None
    inputs = adapter_inputs(checker, body.get("inputs").value, method, options)
    if len(checker.problems) > before or options is None or inputs is None:
        return
    if method.name in NEEDS_DENSITY and options["density"] is None and len(inputs) > 1:
        checker.problems.append(error("E014", f"merge method `{method.name}` over lora bricks needs `density:`",
                                   value.span, "the fraction of values kept, e.g. `density: 0.5`"))
        return
    adapter_merge_node(checker, decl, method.name, inputs, options, seed, body.get("inputs").value)

def adapter_inputs(checker, value: ast.Value, method, options: dict | None) -> tuple[MergeInput, ...] | None:
    if isinstance(value, ast.ListValue):
        pairs = [(item, None) for item in value.items]
    else:
        pairs = [(ast.Ref(e.key, (), e.key_span, e.key_span), e.value) for e in value.entries]
    defaults = {"weight": options["weight"]} if options and options.get("weight") is not None else {}
    out = []
    for ref, params_value in pairs:
        name = adapter_ref(checker, ref, "input")
        params = checker.input_params(method, params_value, defaults, ref.span)
        if name is not None and params is not None:
            out.append(MergeInput(name, tuple(sorted(params.items())), ref.span))
    return tuple(out) if len(out) == len(pairs) else None

def adapter_merge_node(checker, decl, combination: str, inputs, options: dict, seed, inputs_value) -> None:
    nodes = [checker.nodes[i.model] for i in inputs]
    bases = {n.base for n in nodes}
    if len(bases) > 1:
        checker.problems.append(error("E155", f"the lora bricks merged by `{decl.name}` belong to different "
                                   f"models: {', '.join(sorted(bases))}", inputs_value.span,
                                   "merge adapters of one base model"))
        return
    ranks = [node_rank(n) for n in nodes]
    if combination in SAME_RANK and len(set(ranks)) > 1:
        checker.problems.append(error(
            "E156", f"merge method `{combination}` needs lora bricks of one rank, got "
            f"{', '.join(f'{i.model}: {r}' for i, r in zip(inputs, ranks))}", inputs_value.span,
            "use `cat`, `svd` or a `_svd` variant for adapters of different ranks"))
        return
    rank = merged_rank(combination if len(inputs) > 1 else "linear", ranks, options["svd_rank"])
    modules = merged_modules(nodes, rank)
    combine_options = tuple(sorted((k, v) for k, v in options.items() if k != "weight"))
    checker.nodes[decl.name] = LoraMergeNode(decl.name, decl.span, combination, inputs, combine_options,
                                          seed, bases.pop(), modules, nodes[0].arch)


def node_rank(node) -> int:
    """The rank PEFT allots each adapter when merging (r, or its largest pattern rank)."""
    if isinstance(node, LoraSourceNode):
        return peft_rank(node.config)
    if isinstance(node, LoraTrainNode):
        return dict(node.options)["rank"]
    if isinstance(node, LoraExtractNode):
        return node.rank
    return node.modules[0].rank if node.modules else 0


def merged_modules(nodes, rank: int) -> tuple[LoraModuleSpec, ...]:
    seen: dict[str, LoraModuleSpec] = {}
    for node in nodes:
        for module in node.modules:
            seen.setdefault(module.module, LoraModuleSpec(module.module, rank, module.out_features,
                                                          module.in_features))
    return tuple(sorted(seen.values(), key=lambda m: module_order(m.module)))
