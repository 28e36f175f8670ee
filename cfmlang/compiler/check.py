"""Check: turn resolved declarations into the typed IR.

Validates every statement against its registry entry (pydantic parameter models, errors
mapped back to the span of the offending value), binds references, finds cycles, and
checks architecture compatibility from config.json and safetensors headers.
All problems of the stage are reported together.
"""
from __future__ import annotations

from typing import Any

import networkx as nx
from pydantic import BaseModel, ValidationError

from cfmlang import ops
from cfmlang.frontend import ast
from cfmlang.compiler.ir import (FLOAT_DTYPES, MERGEABLE_DTYPES, ArchInfo, CheckedProgram, MergeInput, Node)
from cfmlang.frontend.resolve import Declared, Resolved
from cfmlang.diagnostics import Diagnostic, Span, did_you_mean, error, raise_if_errors
from cfmlang.ops.base import Operation, operation_for
from cfmlang.ops.registry import Gradient, aliases, names_for

DTYPES = FLOAT_DTYPES
METHOD_KEYS = {"brick": "kind"}
"""The key naming a statement's method, where it is not `method` (a brick names its kind)."""


def check(resolved: Resolved) -> CheckedProgram:
    checker = _Checker(resolved.table(), resolved.may_declare)
    checker.problems += resolved.problems
    checker.run()
    settings = _Settings(resolved.settings, checker)
    raise_if_errors(checker.problems)
    nodes = tuple(checker.nodes[name] for name in checker.order if name in checker.nodes)
    return CheckedProgram(resolved.root, nodes, settings.output, settings.seed,
                          settings.dtype, resolved.files,
                          tuple(d for d in checker.problems if not d.is_error))


class _Checker:
    def __init__(self, table: dict[str, Declared], may_declare=lambda name: False):
        self.table = table
        self.may_declare = may_declare
        """Whether an undeclared name may be declared by a statement with a syntax error."""
        self.problems: list[Diagnostic] = []
        self.nodes: dict[str, Node] = {}
        self.order: list[str] = []
        self.operations: dict[str, Operation | None] = {}

    # ---- driver -------------------------------------------------------------------
    def run(self):
        bodies = {name: self.body_of(d.decl) for name, d in self.table.items()}
        self.operations = {name: operation_for(self, self.table[name].decl, body)
                           for name, body in bodies.items() if body is not None}
        deps = {name: operation.references(bodies[name]) if operation else []
                for name, operation in self.operations.items()}
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
        operation = self.operations[declared.decl.name]
        if operation is None:
            self.method_name(declared.decl, body)   # reports the missing or unknown method
            return
        self.add(operation.check(self, declared, body))

    def add(self, node: Node | None) -> None:
        if node is not None:
            self.nodes[node.name] = node

    def method_of(self, decl: ast.Decl, body: ast.MapValue, keyword: str | None = None):
        """The registered method a statement names (reported when missing or unknown)."""
        name = self.method_name(decl, body, keyword)
        return None if name is None else ops.lookup(keyword or decl.keyword, name)

    def method_name(self, decl: ast.Decl, body: ast.MapValue, keyword: str | None = None) -> str | None:
        """The method a statement names, among those registered under `keyword` (the
        statement's keyword by default)."""
        key = METHOD_KEYS.get(decl.keyword, "method")
        entry = body.get(key)
        known = names_for(keyword or decl.keyword)
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

    def flag(self, body: ast.MapValue, key: str) -> bool | None:
        entry = body.get(key)
        if entry is None:
            return False
        if isinstance(entry.value, ast.Bool):
            return entry.value.value
        self.problems.append(error("E032", f"`{key}` must be true or false",
                                   entry.value.span))
        return None

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
        if not self.declared(value, "declare it first, e.g. `model NAME: {source: hf \"dir\"}`"):
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

    def declared(self, ref: ast.Ref, hint: str) -> bool:
        """Whether the name `ref` starts with is declared; E020 (with a did-you-mean, else
        `hint`) when not, unless a statement left out for its syntax error may declare it."""
        if ref.name in self.table:
            return True
        if not self.may_declare(ref.name):
            self.problems.append(error("E020", f"unknown name `{ref.name}`", ref.name_span,
                                       did_you_mean(ref.name, self.table) or hint))
        return False

    def layout_of(self, name: str, purpose: str, span: Span):
        """How the model `name` names its layers (its Architecture); E056 when cfmlang
        cannot describe its family."""
        arch = self.nodes[name].arch
        if arch.layout is None:
            self.problems.append(error(
                "E056", f"{purpose} needs to know how `{name}` (model_type `{arch.model_type}`) names its "
                "layers, which cfmlang cannot describe", span,
                "supported families are listed in docs/architectures.md"))
        return arch.layout

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

    def compatible(self, decl: ast.Decl, names: list[str], vocab: bool = True) -> ArchInfo | None:
        """The first model's architecture when every model shares it (E060-E062 otherwise);
        with `vocab=False` the vocabularies may differ (the rows of embeddings and LM head)."""
        archs = [(n, self.nodes[n].arch) for n in names]
        first_name, first = archs[0]
        ok = True
        compared = ("model_type", "num_layers", "hidden_size", "vocab_size", "intermediate_size")
        for name, arch in archs[1:]:
            for what in compared if vocab else tuple(w for w in compared if w != "vocab_size"):
                a, b = getattr(first, what), getattr(arch, what)
                if a != b:
                    ok = False
                    self.problems.append(error(
                        "E060", f"cannot merge `{first_name}` and `{name}`: {what} {a} != {b}",
                        decl.name_span, "merged models must share one architecture"
                        + (" and vocabulary; a merge aligns different vocabularies with "
                           "`tokenizer: union` (or `base`, or an input's name)"
                           if what == "vocab_size" else "")))
                    break
            else:
                ok = self.same_tensors(decl, first_name, first, name, arch, vocab) and ok
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

    def same_tensors(self, decl, first_name, first: ArchInfo, name, arch: ArchInfo, vocab: bool = True) -> bool:
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
            if other.shape != spec.shape and (vocab or not _vocabulary_rows(first, spec, arch, other)):
                self.problems.append(error("E061", f"tensor `{spec.name}` has shape {list(spec.shape)} in "
                                           f"`{first_name}` but {list(other.shape)} in `{name}`",
                                           decl.name_span, "merged models must share every tensor shape"))
                return False
        return True


def _vocabulary_rows(first: ArchInfo, spec, arch: ArchInfo, other) -> bool:
    """Whether two tensors differ only in their token rows (embeddings, LM head)."""
    layout = first.layout
    return (layout is not None and layout.role_of(spec.name) in ("embed", "lm_head")
            and spec.shape[:1] == (first.vocab_size,) and other.shape[:1] == (arch.vocab_size,)
            and spec.shape[1:] == other.shape[1:])


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
        elif checker.declared(value, "declare it first"):
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
    fields = aliases(model)
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
