"""`cfmc import`: translate a mergekit YAML configuration into an equivalent .brick program.

The YAML is read with `yaml.compose`, so every problem points at its line and column.
What has a cfmlang equivalent is translated:

- every distinct model path -> `model NAME: {source: hf "path"}`, NAME derived from the
  path's last component;
- `merge_method`, `base_model`, `dtype` -> one `merge` node with `method:`, `base:` and
  `dtype:`; `models[].parameters` -> `inputs: {NAME: {...}}`; global (and slice-level)
  `parameters` -> node-level keys, which cfmlang, like mergekit, uses as defaults for
  every input;
- a single slice whose sources all span the whole model -> the same as `models:`;
- several YAML documents (mergekit-multi's `name:`, mergekit-mega's `out_path:`) -> one
  node each; a reference to another document's name or out_path is a node reference;
- `passthrough` over slices of one source each (layer stacking, depth up-scaling) ->
  `grow NAME: {method: stack, slices: [a.layers[0:24], {from: b.layers[8:32], scale: ...}]}`;
- mergekit's conditional parameters (`[{filter: self_attn, value: X}, {value: Y}]`) ->
  the filter map `{self_attn: X, default: Y}` (first key contained in the tensor name
  wins, `default` otherwise). A per-input list without a catch-all falls back to the
  node-level value in mergekit; the translation folds that fallback into the map.

- `tokenizer_source` and `tokenizer: {source, tokens, pad_to_multiple_of}` -> the merge's
  `tokenizer:` (model paths become names); `chat_template` -> `chat_template:` (cfmlang's
  built-ins `chatml`, `llama3`, `alpaca`, `auto`, or the template text itself).

Everything else (several slices or a partial slice of any other method, `modules:`, a
tokenizer model outside the merge, other built-in chat templates, an `out_dtype` other than `dtype`, LoRA `model+lora`
references, hub revisions, unknown methods or keys) is reported as E100 with its
position; all of them at once. A YAML syntax error is E101.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfmlang.compiler.ir import FLOAT_DTYPES
from cfmlang.diagnostics import SOURCES, CompileError, Diagnostic, Span, did_you_mean, error
from cfmlang.frontend import ast
from cfmlang.frontend.format import NOWHERE, generated_entry, generated_ref, print_program
from cfmlang.importers.vocabulary import (TokenizerSetting, chat_template_entry, read_chat_template,
                                          read_tokenizer, tokenizer_entry)

CANNOT = "E100"
BAD_YAML = "E101"

# How mergekit 0.1.5 treats `base_model`, per method (its input contracts): "ignored"
# methods merge the base like any other input (it is appended to `models:` when absent),
# the others take it as the base.
BASE_POLICY = {
    "linear": "ignored", "passthrough": "ignored", "karcher": "ignored",
    "multislerp": "optional", "nuslerp": "optional",
}
DTYPES = tuple(FLOAT_DTYPES)
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
            "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name", "out_path")
MODEL_ENTRY_KEYS = ("model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
# keys of a merge node that are not method parameters
STRUCTURAL = ("method", "inputs", "base", "dtype", "seed", "description", "tokenizer", "chat_template")
RESERVED_NAMES = {"true", "false", "null"}
NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
UNSUPPORTED = {
    "modules": ("`modules:` (per-module merges of multi-module models)",
                "cfmlang merges whole models; per-module configs have no equivalent yet"),
}
RANGE_HELP = ("cfmlang merges whole models, and stacks layer ranges with `grow` (`method: stack`, "
              "which `merge_method: passthrough` slices translate to); a different merge per layer "
              "range has no equivalent yet")
STACK_PARAMS = ("scale",)


def translate(text: str, file: str = "<input>", *, out_dir: str | Path | None = None,
              cwd: str | Path | None = None) -> str:
    """The .brick program equivalent to the mergekit YAML `text`.

    Relative model paths are taken, as mergekit does, from `cwd` (default: the current
    directory). When `out_dir` (where the .brick file will live) is given and differs,
    existing relative paths are rewritten relative to it. Raises CompileError (E100,
    E101) with every problem found."""
    SOURCES.texts[file] = text
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    return _Importer(text, file, cwd, None if out_dir is None else Path(out_dir)).run()


def import_file(path: str | Path, output: str | Path | None = None, *, force: bool = False,
                cwd: str | Path | None = None) -> str:
    """Translate the YAML file at `path`; write the program to `output` when given
    (refusing to replace an existing file unless `force`) and return its text."""
    path = Path(path)
    if not path.is_file():
        raise CompileError([error("E040", f"cannot read `{path}`: no such file", None, "check the path")])
    output = None if output is None else Path(output)
    if output is not None:
        refuse_to_overwrite(output, force)
    text = translate(path.read_text(encoding="utf-8"), str(path),
                     out_dir=None if output is None else output.parent, cwd=cwd)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
    return text


def refuse_to_overwrite(output: Path, force: bool) -> None:
    if output.is_dir():
        raise CompileError([error("E082", f"refusing to write {output}: it is a directory", None,
                                  "name the .brick file to write")])
    if output.exists() and not force:
        raise CompileError([error("E082", f"refusing to overwrite {output}: it exists", None,
                                  "pass --force to replace it, or choose another path")])


# ---- reading the YAML -----------------------------------------------------------------------

@dataclass
class _Input:
    """One merge input: a model reference and its own parameters (a YAML mapping node)."""

    ref: Any                 # the YAML node of the reference
    path: str | None         # None when the reference could not be translated
    params: list | None = None   # [(name, key node, value node)] of its `parameters:`
    layer_range: Any = None  # SequenceNode (slices only)
    settings: dict = field(default_factory=dict)   # parameter name -> _Setting
    slice_scope: Any = None  # the `parameters:` node of its slice (stacked slices only)
    slice_settings: dict = field(default_factory=dict)   # the same, parsed
    bounds: tuple[int, int] | None = None   # its layer range (stacked slices only)


@dataclass
class _Setting:
    """A parameter value as an ordered list of (filter or None, value); None means
    "every tensor" (mergekit: no filter, `*` or an empty filter)."""

    entries: list[tuple[str | None, ast.Value]]

    @property
    def complete(self) -> bool:
        return any(f is None for f, _ in self.entries)


@dataclass
class _Merge:
    method: str | None = None
    base: _Input | None = None
    inputs: list[_Input] = field(default_factory=list)
    scopes: list[Any] = field(default_factory=list)    # slice-level, then global `parameters:` nodes
    scope_settings: list[dict] = field(default_factory=list)   # the same, parsed: name -> _Setting
    dtype: str | None = None
    form: str = "models"     # "models", "slices" (one slice: a merge) or "stack" (passthrough slices)
    root: Any = None         # the YAML document
    name: str | None = None       # `name:` (mergekit-multi): later documents refer to it by it
    out_path: str | None = None   # `out_path:` (mergekit-mega): ... or by this path
    node: str = ""           # its node's name in the program
    tokenizer: TokenizerSetting | None = None     # `tokenizer_source` / `tokenizer:`
    chat_template: tuple[str, str] | None = None  # ("name" | "text", value)

    @property
    def references(self) -> tuple[str, ...]:
        """The model references of later stages that mean this stage's output."""
        return tuple(r for r in (self.name, self.out_path and os.path.normpath(self.out_path)) if r)


class _Importer:
    def __init__(self, text: str, file: str, cwd: Path, out_dir: Path | None):
        self.text, self.file, self.cwd, self.out_dir = text, file, cwd, out_dir
        self.problems: list[Diagnostic] = []
        self.notes: list[str] = []
        try:
            import yaml
        except ImportError:
            raise CompileError([error(CANNOT, "cannot translate: PyYAML is not installed", None,
                                      "pip install pyyaml")]) from None

        self.yaml = yaml
        self.constructor = yaml.constructor.SafeConstructor()

    # ---- helpers over composed nodes ------------------------------------------------------
    def span(self, node) -> Span:
        start, end = node.start_mark, node.end_mark
        if end.line > start.line and end.column == 0:   # a block ending at a line break
            return Span(self.file, start.line + 1, start.column + 1, start.line + 1, start.column + 2)
        return Span(self.file, start.line + 1, start.column + 1, end.line + 1, end.column + 1)

    def cannot(self, node, message: str, *helps: str) -> None:
        self.problems.append(error(CANNOT, f"cannot translate: {message}",
                                   None if node is None else self.span(node), *helps))

    def mapping(self, node, what: str, allowed: tuple[str, ...] | None = None) -> dict[str, tuple] | None:
        """{key: (key_node, value_node)} of a mapping node; problems reported."""
        if not isinstance(node, self.yaml.MappingNode):
            self.cannot(node, f"{what} must be a mapping, not {self.describe(node)}")
            return None
        out: dict[str, tuple] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node) if isinstance(key_node, self.yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.cannot(key_node, f"keys of {what} must be strings")
                continue
            if key in out:
                self.cannot(key_node, f"key `{key}` is given twice in {what}",
                            f"it is first given at line {out[key][0].start_mark.line + 1}; YAML would keep "
                            "only this last one: remove one of them")
                continue
            if allowed is not None and key not in allowed:
                self.cannot(key_node, f"unknown key `{key}` in {what}",
                            did_you_mean(key, allowed) or f"known keys: {', '.join(allowed)}")
                continue
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node, what: str) -> list | None:
        if not isinstance(node, self.yaml.SequenceNode):
            self.cannot(node, f"{what} must be a list, not {self.describe(node)}")
            return None
        return list(node.value)

    def is_null(self, node) -> bool:
        return isinstance(node, self.yaml.ScalarNode) and self.scalar(node) is None

    def scalar(self, node) -> Any:
        return self.constructor.construct_object(node, deep=True)

    def describe(self, node) -> str:
        if isinstance(node, self.yaml.MappingNode):
            return "a mapping"
        if isinstance(node, self.yaml.SequenceNode):
            return "a list"
        value = self.scalar(node)
        return "nothing (null)" if value is None else f"{type(value).__name__} `{node.value}`"

    def string(self, node, what: str) -> str | None:
        if isinstance(node, self.yaml.ScalarNode):
            value = self.scalar(node)
            if isinstance(value, str) and value:
                return value
        self.cannot(node, f"{what} must be a string, not {self.describe(node)}")
        return None

    # ---- driver ----------------------------------------------------------------------------
    def run(self) -> str:
        yaml = self.yaml
        try:
            documents = [d for d in yaml.compose_all(self.text, Loader=yaml.SafeLoader) if d is not None]
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            span = None if mark is None else Span.point(self.file, mark.line + 1, mark.column + 1)
            notes = [f"{exc.context} (line {exc.context_mark.line + 1})"] if exc.context and exc.context_mark else []
            raise CompileError([error(BAD_YAML, f"invalid YAML: {exc.problem or exc}", span,
                                      "fix the YAML syntax", notes=notes)]) from None
        except yaml.YAMLError as exc:
            raise CompileError([error(BAD_YAML, f"invalid YAML: {exc}", None, "fix the YAML syntax")]) from None
        if not documents:
            raise CompileError([error(CANNOT, "cannot translate: the file holds no mergekit configuration",
                                      Span.point(self.file, 1, 1), "a config needs `merge_method:` and `models:`")])
        stages = [self.document(root) for root in documents]
        if self.problems or None in stages:
            raise CompileError(self.problems)
        return self.emit(stages)

    def document(self, root) -> _Merge | None:
        yaml = self.yaml
        try:
            return self.config(root)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark
            raise CompileError(self.problems + [error(
                BAD_YAML, f"invalid YAML: {exc.problem}",
                None if mark is None else Span.point(self.file, mark.line + 1, mark.column + 1),
                "mergekit configs use plain YAML values only")]) from None

    def config(self, root) -> _Merge | None:
        top = self.mapping(root, "a mergekit config", TOP_KEYS)
        if top is None:
            return None
        # `key: null` is the same as no key for mergekit
        top = {k: v for k, v in top.items() if not self.is_null(v[1])}
        merge = _Merge(root=root)
        for key in ("name", "out_path"):
            if key in top:
                setattr(merge, key, self.string(top[key][1], f"`{key}`"))
        if "merge_method" in top:
            merge.method = self.method(top["merge_method"][1])
        else:
            self.cannot(root, "the config has no `merge_method:`", "add e.g. `merge_method: linear`")
        if "modules" in top:
            self.cannot(top["modules"][0], *UNSUPPORTED["modules"])
        merge.tokenizer = read_tokenizer(self, top)
        if "chat_template" in top:
            merge.chat_template = read_chat_template(self, top["chat_template"][1])
        merge.dtype = self.dtype(top.get("dtype"), top.get("out_dtype"))
        forms = [k for k in ("models", "slices") if k in top]
        if len(forms) == 2:
            self.cannot(top["slices"][0], "both `models:` and `slices:` are given", "mergekit takes exactly one")
        elif not forms and "modules" not in top:
            self.cannot(root, "the config has neither `models:` nor `slices:`", "list the models to merge")
        base_node = top["base_model"][1] if "base_model" in top else None
        if "slices" in top and len(forms) == 1 and merge.method == "passthrough":
            merge.form = "stack"
            self.stacked_slices(top["slices"][1], merge)
        elif "slices" in top and len(forms) == 1:
            merge.form = "slices"
            base_node = self.slices(top["slices"], merge, base_node)
        elif "models" in top:
            self.models(top["models"][1], merge)
        if base_node is not None:
            merge.base = _Input(base_node, self.model_path(base_node))
        if "parameters" in top:
            merge.scopes.append(top["parameters"][1])
        self.params_of(merge)
        return merge

    def method(self, node) -> str | None:
        from cfmlang.ops.registry import lookup, names_for

        name = self.string(node, "`merge_method`")
        if name is None:
            return None
        if lookup("merge", name) is None:
            known = names_for("merge")
            self.cannot(node, f"merge method `{name}` has no cfmlang equivalent",
                        did_you_mean(name, known) or f"cfmlang merge methods: {', '.join(known)}")
            return None
        return name

    def dtype(self, dtype_entry, out_entry) -> str | None:
        dtype = self.dtype_name(dtype_entry[1]) if dtype_entry else None
        if out_entry is not None:
            out = self.dtype_name(out_entry[1])
            if out is not None and out != dtype:
                self.cannot(out_entry[0], f"`out_dtype: {out}` differs from `dtype: {dtype or '(inputs)'}`",
                            "cfmlang's `dtype:` is both the working and the output dtype; set `dtype` "
                            "and `out_dtype` to the same value, or drop `out_dtype`")
        return dtype

    def dtype_name(self, node) -> str | None:
        name = self.string(node, "a dtype")
        if name is None:
            return None
        name = name.removeprefix("torch.")
        if name not in DTYPES:
            self.cannot(node, f"dtype `{name}`", did_you_mean(name, DTYPES) or f"cfmlang dtypes: {', '.join(DTYPES)}")
            return None
        return name

    # ---- inputs -------------------------------------------------------------------------------
    def models(self, node, merge: _Merge) -> None:
        items = self.sequence(node, "`models`")
        if items is None:
            return
        if not items:
            self.cannot(node, "`models` is empty", "list the models to merge")
        for item in items:
            entry = self.mapping(item, "a `models` entry", MODEL_ENTRY_KEYS)
            if entry is None:
                continue
            if "model" not in entry:
                self.cannot(item, "a `models` entry without `model:`")
                continue
            ref = entry["model"][1]
            params = entry["parameters"][1] if "parameters" in entry else None
            merge.inputs.append(_Input(ref, self.model_path(ref), self.param_map(params)))

    def slices(self, entry, merge: _Merge, base_node):
        """A single slice whose sources all cover the whole model is a plain merge;
        anything else needs layer stacking. Returns the base model node in force."""
        key_node, node = entry
        items = self.sequence(node, "`slices`")
        if items is None:
            return base_node
        if len(items) != 1:
            self.cannot(key_node, f"`{merge.method}` over {len(items)} output slices", RANGE_HELP)
            for item in items:   # still report what else could not be translated in them
                for source in self.sources_of(item):
                    if "model" in source:
                        self.model_path(source["model"][1])
            return base_node
        slice_map = self.mapping(items[0], "a slice", SLICE_KEYS)
        if slice_map is None:
            return base_node
        self.no_residual_weight(slice_map)
        if "base_model" in slice_map and not self.is_null(slice_map["base_model"][1]):
            base_node = slice_map["base_model"][1]
        if "parameters" in slice_map:
            merge.scopes.append(slice_map["parameters"][1])
        if "sources" not in slice_map:
            self.cannot(items[0], "a slice without `sources:`")
            return base_node
        sources = self.sequence(slice_map["sources"][1], "`sources`")
        merge.inputs += [item for item in map(self.slice_input, sources or ()) if item is not None]
        self.whole_ranges(merge.inputs)
        return base_node

    def slice_input(self, source) -> _Input | None:
        entry = self.mapping(source, "a slice source", SOURCE_KEYS)
        if entry is None:
            return None
        if "model" not in entry or "layer_range" not in entry:
            self.cannot(source, "a slice source needs `model:` and `layer_range:`")
            return None
        ref = entry["model"][1]
        params = entry["parameters"][1] if "parameters" in entry else None
        return _Input(ref, self.model_path(ref), self.param_map(params), entry["layer_range"][1])

    def no_residual_weight(self, slice_map: dict) -> None:
        if "residual_weight" in slice_map:
            self.cannot(slice_map["residual_weight"][0], "`residual_weight` of a slice",
                        "cfmlang merges and stacks have no residual weight")

    def stacked_slices(self, node, merge: _Merge) -> None:
        """`passthrough` slices: each takes a layer range of one model, in order."""
        items = self.sequence(node, "`slices`")
        if items is None:
            return
        if not items:
            self.cannot(node, "`slices` is empty", "list the layer ranges to stack")
        for item in items:
            slice_map = self.mapping(item, "a slice", SLICE_KEYS)
            if slice_map is None:
                continue
            self.no_residual_weight(slice_map)
            if "base_model" in slice_map and not self.is_null(slice_map["base_model"][1]):
                self.notes.append("`base_model` of a slice is not used by `passthrough` and was left out")
            if "sources" not in slice_map:
                self.cannot(item, "a slice without `sources:`")
                continue
            sources = self.sequence(slice_map["sources"][1], "`sources`")
            if sources is not None and len(sources) != 1:
                self.cannot(slice_map["sources"][0], f"a `passthrough` slice with {len(sources)} sources",
                            "each passthrough slice takes its layers from exactly one model")
                continue
            stacked = self.slice_input(sources[0]) if sources else None
            if stacked is None:
                continue
            stacked.slice_scope = slice_map["parameters"][1] if "parameters" in slice_map else None
            stacked.bounds = self.layer_bounds(stacked)
            merge.inputs.append(stacked)

    def layer_bounds(self, item: _Input) -> tuple[int, int] | None:
        """[start, end) of a stacked slice, checked against the model when its config is readable."""
        values = self.sequence(item.layer_range, "`layer_range`")
        bounds = [self.scalar(v) if isinstance(v, self.yaml.ScalarNode) else None for v in values or ()]
        if values is None or len(bounds) != 2 or not all(type(b) is int for b in bounds):
            if values is not None:
                self.cannot(item.layer_range, "`layer_range` must be two integers [start, end]")
            return None
        start, end = bounds
        if not 0 <= start < end:
            self.cannot(item.layer_range, f"`layer_range: [{start}, {end}]` takes no layers",
                        "a range is [start, end) with 0 <= start < end")
            return None
        layers = self.layer_count(item.path) if item.path else None
        if layers is not None and end > layers:
            self.cannot(item.layer_range, f"`layer_range: [{start}, {end}]` goes past the "
                        f"{layers} layers of `{item.path}`", f"the last layer is {layers - 1}")
            return None
        return start, end

    def sources_of(self, item) -> list[dict]:
        slice_map = self.mapping(item, "a slice", SLICE_KEYS)
        if slice_map is None or "sources" not in slice_map:
            return []
        sources = self.sequence(slice_map["sources"][1], "`sources`") or []
        return [m for m in (self.mapping(s, "a slice source", SOURCE_KEYS) for s in sources) if m is not None]

    def whole_ranges(self, inputs: list[_Input]) -> None:
        ranges = []
        for item in inputs:
            values = self.sequence(item.layer_range, "`layer_range`")
            bounds = [self.scalar(v) if isinstance(v, self.yaml.ScalarNode) else None for v in values or ()]
            if values is None or len(bounds) != 2 or not all(type(b) is int for b in bounds):
                if values is not None:
                    self.cannot(item.layer_range, "`layer_range` must be two integers [start, end]")
                return
            ranges.append((tuple(bounds), item))
        if not ranges:
            return
        first, _ = ranges[0]
        for bounds, item in ranges[1:]:
            if bounds != first:
                self.cannot(item.layer_range, f"sources of one slice take different layers "
                            f"({list(first)} and {list(bounds)})", RANGE_HELP)
                return
        start, end = first
        if start != 0:
            self.cannot(ranges[0][1].layer_range, f"`layer_range: [{start}, {end}]` takes a part "
                        "of the model", RANGE_HELP)
            return
        for bounds, item in ranges:
            layers = self.layer_count(item.path) if item.path else None
            if layers is not None and layers != end:
                self.cannot(item.layer_range, f"`layer_range: [0, {end}]` takes {end} of the "
                            f"{layers} layers of `{item.path}`", RANGE_HELP)
                return
            if layers is None and item.path:
                self.notes.append(f"`layer_range: [0, {end}]` of `{item.path}` is taken to be the whole "
                                  "model (its config.json could not be read)")

    def layer_count(self, path: str) -> int | None:
        folder = Path(path) if Path(path).is_absolute() else self.cwd / path
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        for holder in (config, config.get("text_config") or {}):
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(holder.get(key), int):
                    return holder[key]
        return None

    def model_path(self, node) -> str | None:
        """The local path or hub id of a mergekit model reference; LoRA, revisions and
        architecture overrides are reported."""
        if isinstance(node, self.yaml.MappingNode):
            entry = self.mapping(node, "a model reference", ("model", "lora", "override_architecture"))
            if entry is None:
                return None
            ok = True
            if "lora" in entry and self.scalar(entry["lora"][1]) is not None:
                self.lora(entry["lora"][0])
                ok = False
            if "override_architecture" in entry and self.scalar(entry["override_architecture"][1]) is not None:
                self.cannot(entry["override_architecture"][0], "`override_architecture`",
                            "cfmlang reads the architecture from the model's config.json")
                ok = False
            if "model" not in entry:
                self.cannot(node, "a model reference without `model:`")
                return None
            inner = entry["model"][1]
            if isinstance(inner, self.yaml.MappingNode):
                path_map = self.mapping(inner, "a model path", ("path", "revision"))
                if path_map is None or "path" not in path_map:
                    if path_map is not None:
                        self.cannot(inner, "a model path without `path:`")
                    return None
                if "revision" in path_map and self.scalar(path_map["revision"][1]) is not None:
                    self.revision(path_map["revision"][0])
                    ok = False
                path = self.string(path_map["path"][1], "a model path")
                return path if ok else None
            path = self.plain_reference(inner)
            return path if ok else None
        return self.plain_reference(node)

    def plain_reference(self, node) -> str | None:
        text = self.string(node, "a model reference")
        if text is None:
            return None
        if "+" in text:
            self.lora(node)
            return None
        if "@" in text:
            self.revision(node)
            return None
        return text

    def lora(self, node) -> None:
        self.cannot(node, "a LoRA reference (`model+lora`)",
                    "merge the adapter into its model first (peft `merge_and_unload`) and name the result; "
                    "`brick NAME: {kind: lora}` is planned")

    def revision(self, node) -> None:
        self.cannot(node, "a hub revision (`model@revision`)",
                    "cfmlang reads local directories: download that revision and name its directory")

    # ---- parameters ---------------------------------------------------------------------------
    def param_map(self, node) -> list[tuple[str, Any, Any]] | None:
        """[(name, key node, value node)] of a `parameters:` mapping (null = none)."""
        if node is None or self.is_null(node):
            return None
        entries = self.mapping(node, "`parameters`")
        if entries is None:
            return None
        out = []
        for name, (key_node, value_node) in entries.items():
            if name in STRUCTURAL:
                self.cannot(key_node, f"a parameter named `{name}`",
                            f"`{name}` is a key of cfmlang merge nodes, not a method parameter")
                continue
            out.append((name, key_node, value_node))
        return out

    def params_of(self, merge: _Merge) -> None:
        """Parse every parameter setting now, so that all problems are reported."""
        scopes = [self.param_map(s) or [] for s in merge.scopes]
        merge.scope_settings = [{name: self.setting(value) for name, _, value in scope} for scope in scopes]
        for item in merge.inputs:
            item.settings = {name: self.setting(value) for name, _, value in (item.params or [])}
            slice_params = self.param_map(item.slice_scope) or []
            item.slice_settings = {name: self.setting(value) for name, _, value in slice_params}
        if merge.form == "stack":
            self.stack_parameters(scopes + [item.params or [] for item in merge.inputs] +
                                  [self.param_map(item.slice_scope) or [] for item in merge.inputs])

    def stack_parameters(self, scopes: list[list]) -> None:
        for scope in scopes:
            for name, key_node, _ in scope:
                if name not in STACK_PARAMS:
                    self.cannot(key_node, f"a `{name}` parameter of `passthrough`",
                                "passthrough slices take only `scale` (a stack slice's only parameter)")

    def setting(self, node) -> _Setting | None:
        yaml = self.yaml
        if isinstance(node, yaml.MappingNode):
            entry = self.condition(node)
            return None if entry is None else _Setting([entry])
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.cannot(node, "an empty list has no value", "give a number or a list of numbers")
                return None
            if all(isinstance(item, yaml.MappingNode) for item in node.value):
                entries = [self.condition(item) for item in node.value]
                if any(e is None for e in entries):
                    return None
                return _Setting(self.reachable(entries, node))
        value = self.value(node)
        return None if value is None else _Setting([(None, value)])

    def condition(self, node) -> tuple[str | None, ast.Value] | None:
        entry = self.mapping(node, "a conditional parameter", ("filter", "value"))
        if entry is None:
            return None
        if "value" not in entry:
            self.cannot(node, "a conditional parameter without `value:`")
            return None
        value = self.value(entry["value"][1])
        filter_ = None
        if "filter" in entry:
            filter_node = entry["filter"][1]
            raw = self.scalar(filter_node) if isinstance(filter_node, self.yaml.ScalarNode) else ...
            if raw is not None and not isinstance(raw, str):
                self.cannot(filter_node, f"`filter` must be a string, not {self.describe(filter_node)}")
                return None
            if raw == "default":
                self.cannot(filter_node, "a filter named `default`",
                            "`default` is the catch-all key of cfmlang filter maps")
                return None
            filter_ = None if raw in (None, "", "*") else raw
        return None if value is None else (filter_, value)

    def reachable(self, entries: list, node) -> list:
        """Entries mergekit can reach: a filter repeated, or anything after the first
        catch-all, is never used."""
        out, seen = [], set()
        for filter_, value in entries:
            if filter_ in seen:
                self.notes.append(f"a repeated `{filter_}` filter at line {node.start_mark.line + 1} "
                                  "is never reached in mergekit and was left out")
                continue
            seen.add(filter_)
            out.append((filter_, value))
            if filter_ is None:
                if len(out) < len(entries):
                    self.notes.append(f"filter entries after the catch-all at line "
                                      f"{node.start_mark.line + 1} are never reached in mergekit "
                                      "and were left out")
                break
        return out

    def value(self, node) -> ast.Value | None:
        """A scalar or a list of scalars (a gradient), as a cfmlang value."""
        yaml = self.yaml
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.cannot(node, "an empty list has no value", "give a number or a list of numbers")
                return None
            if not all(isinstance(item, yaml.ScalarNode) for item in node.value):
                self.cannot(node, "a list of lists or mappings as a parameter value",
                            "parameter values are numbers, or lists of numbers (gradients)")
                return None
            items = [self.value(item) for item in node.value]
            return None if None in items else ast.ListValue(tuple(items), NOWHERE)
        if not isinstance(node, yaml.ScalarNode):
            self.cannot(node, f"{self.describe(node)} as a parameter value")
            return None
        value = self.scalar(node)
        if isinstance(value, bool):
            return ast.Bool(value, NOWHERE)
        if isinstance(value, int):
            return ast.Number(value, NOWHERE)
        if isinstance(value, float):
            if not math.isfinite(value):
                self.cannot(node, f"the non-finite number `{node.value}`", "cfmlang numbers are finite")
                return None
            return ast.Number(value, NOWHERE)
        if isinstance(value, str):
            if NUMBER_TEXT.match(value):
                # YAML 1.1 reads `1e-3` as a string; mergekit turns it into a number
                return ast.Number(int(value) if value.lstrip("+-").isdigit() else float(value), NOWHERE)
            return ast.String(value, NOWHERE)
        self.cannot(node, f"{self.describe(node)} as a parameter value")
        return None

    # ---- output -------------------------------------------------------------------------------
    def emit(self, stages: list[_Merge]) -> str:
        """The program: one `model` per input path that no stage produces, one node per
        stage (a YAML document), the final stage as the output."""
        final = self.final_stage(stages)
        self.node_names(stages, final)
        produced = {ref: stage.node for stage in stages for ref in stage.references}
        plans = [self.stage_inputs(stage) for stage in stages]
        if self.problems:
            raise CompileError(self.problems)
        paths = [item.path for base, inputs in plans for item in ([base] if base else []) + inputs]
        models = self.names([p for p in paths if self.produced_by(p, produced) is None],
                            {stage.node for stage in stages})
        names = {p: self.produced_by(p, produced) or models[p] for p in paths}
        statements = self.model_decls(models)
        for stage, (base, inputs) in zip(stages, plans):
            statements.append(self.stack_decl(stage, names) if stage.form == "stack" else
                              self.merge_decl(stage, base, inputs, names))
        if self.problems:   # tokenizer models outside the merges
            raise CompileError(self.problems)
        statements.append(ast.Setting("output", NOWHERE, generated_ref(final.node), NOWHERE))
        return print_program(statements, self.header(models))

    def final_stage(self, stages: list[_Merge]) -> _Merge:
        """mergekit-multi: the document without `name:`; mergekit-mega: the last one."""
        unnamed = [stage for stage in stages if stage.name is None]
        if len(unnamed) == len(stages):        # one document, or mergekit-mega
            return stages[-1]
        for stage in unnamed[1:]:
            self.cannot(stage.root, f"{len(unnamed)} documents have no `name:`",
                        "in a mergekit-multi config every document but the final merge has a `name:`")
        return unnamed[0] if unnamed else stages[-1]

    def node_names(self, stages: list[_Merge], final: _Merge) -> None:
        taken: set[str] = set()
        for stage in stages:
            default = "stacked" if stage.form == "stack" else "merged"
            wanted = default if stage is final else identifier(stage.name or stage.out_path or default)
            stage.node = unique(wanted, taken)
            taken.add(stage.node)

    @staticmethod
    def produced_by(path: str, produced: dict[str, str]) -> str | None:
        return produced.get(path) or produced.get(os.path.normpath(path))

    def stage_inputs(self, merge: _Merge) -> tuple[_Input | None, list[_Input]]:
        """The base and the inputs of a merge after mergekit's base policy, duplicates reported."""
        if merge.form == "stack":
            return None, list(merge.inputs)
        policy = BASE_POLICY.get(merge.method, "required")
        inputs = list(merge.inputs)
        base = merge.base
        paths = [i.path for i in inputs]
        if base is not None and policy == "ignored":
            if merge.form == "models" and base.path not in paths:
                inputs.append(base)      # mergekit merges it as one more input
            elif merge.form == "slices":
                self.notes.append(f"`base_model` is not used by `{merge.method}` in a slice and was left out")
            base = None
        seen: dict[str, Any] = {}
        for item in inputs:
            if item.path in seen:
                self.cannot(item.ref, f"model `{item.path}` is listed twice",
                            f"first listed at line {seen[item.path].start_mark.line + 1}; mergekit "
                            "refuses duplicate inputs")
            seen.setdefault(item.path, item.ref)
        if base is not None:
            # the base is the `base:`; it stays an input only to keep its own parameters
            inputs = [i for i in inputs if i.path != base.path or i.settings]
        return base, inputs

    def merge_decl(self, merge: _Merge, base: _Input | None, inputs: list[_Input],
                   names: dict[str, str]) -> ast.Decl:
        body = [generated_entry("method", generated_ref(merge.method))]
        if base is not None:
            body.append(generated_entry("base", generated_ref(names[base.path])))
        node_keys = list(dict.fromkeys(k for scope in merge.scope_settings for k in scope))
        for key in node_keys:
            chain = [scope[key] for scope in merge.scope_settings if key in scope]
            if None not in chain:
                body.append(generated_entry(key, setting_value(chain)))
        given = []
        for item in inputs:
            params = [generated_entry(key, setting_value([setting] + [scope[key] for scope in merge.scope_settings
                                                            if key in scope]))
                      for key, setting in item.settings.items()]
            given.append((names[item.path], params))
        if any(params for _, params in given):
            body.append(generated_entry("inputs", ast.MapValue(tuple(generated_entry(name, ast.MapValue(tuple(params), NOWHERE))
                                                           for name, params in given), NOWHERE)))
        else:
            body.append(generated_entry("inputs", ast.ListValue(tuple(generated_ref(name) for name, _ in given), NOWHERE)))
        if merge.dtype:
            body.append(generated_entry("dtype", generated_ref(merge.dtype)))
        if merge.tokenizer is not None:
            local = {p: names[p] for p in [i.path for i in inputs] + ([base.path] if base else [])}
            tokenizer = tokenizer_entry(self, merge.tokenizer, local)
            body += [tokenizer] if tokenizer else []
        if merge.chat_template is not None:
            body.append(chat_template_entry(merge.chat_template))
        return declaration("merge", merge.node, body)

    def stack_decl(self, merge: _Merge, names: dict[str, str]) -> ast.Decl:
        tokenizer = merge.tokenizer
        if (tokenizer is not None and (tokenizer.source != "base" or tokenizer.tokens
                                       or tokenizer.pad_to_multiple_of)) or merge.chat_template is not None:
            self.cannot((tokenizer.node if tokenizer else None) or merge.root,
                        "a tokenizer or chat template other than `tokenizer_source: base` on passthrough slices",
                        "cfmlang's `grow` (stack) keeps the first slice's tokenizer")
        body = [generated_entry("method", generated_ref("stack"))]
        if merge.dtype:
            body.append(generated_entry("dtype", generated_ref(merge.dtype)))
        slices = []
        for item in merge.inputs:
            start, end = item.bounds
            layers = ast.Ref(names[item.path], (ast.Attr("layers", NOWHERE),
                                                ast.Index(start, end, True, False, NOWHERE)), NOWHERE, NOWHERE)
            chain = [s.get("scale") for s in (item.settings, item.slice_settings, *merge.scope_settings)
                     if "scale" in s]
            scaled = chain and None not in chain
            slices.append(ast.MapValue((generated_entry("from", layers), generated_entry("scale", setting_value(chain))), NOWHERE)
                          if scaled else layers)
        body.append(generated_entry("slices", ast.ListValue(tuple(slices), NOWHERE)))
        return declaration("grow", merge.node, body)

    def header(self, names: dict[str, str]) -> list[str]:
        """The leading comment lines."""
        lines = [f"Imported from `{Path(self.file).name}` (a mergekit configuration) by `cfmc import`."]
        lines += self.path_notes(names)
        lines += [f"note: {n}" for n in dict.fromkeys(self.notes)]
        return lines

    def model_decls(self, names: dict[str, str]) -> list[ast.Statement]:
        """One `model` declaration per input path."""
        return [declaration("model", name, [generated_entry("source", ast.Tagged("hf", self.written_path(path),
                                                                       NOWHERE, NOWHERE))])
                for path, name in names.items()]

    def names(self, paths: list[str], taken: set[str]) -> dict[str, str]:
        """A declaration name per path, unique and not in `taken`."""
        out: dict[str, str] = {}
        for path in paths:
            if path not in out:
                out[path] = unique(identifier(path), taken | set(out.values()))
        return out

    def relocated(self) -> bool:
        return self.out_dir is not None and (self.cwd / self.out_dir).resolve() != self.cwd.resolve()

    def written_path(self, path: str) -> str:
        if os.path.isabs(path) or not self.relocated() or not (self.cwd / path).exists():
            return path
        rel = os.path.relpath((self.cwd / path).resolve(), (self.cwd / self.out_dir).resolve())
        return Path(rel).as_posix()

    def path_notes(self, names: dict[str, str]) -> list[str]:
        relative = [p for p in names if not os.path.isabs(p)]
        if not relative:
            return []
        lines = []
        if self.relocated() and any((self.cwd / p).exists() for p in relative):
            lines.append("Relative paths were relative to the working directory (as in mergekit); they are "
                         "rewritten relative to this file's directory, where cfmlang resolves them.")
        else:
            lines.append("Relative paths are resolved from this file's directory (mergekit resolved them "
                         "from the working directory).")
        for path in relative:
            if not (self.cwd / path).exists():
                lines.append(f"note: `{path}` is not a local directory (a Hugging Face hub id?): download "
                             "it and point the source at its directory.")
        return lines


# ---- rendering helpers ---------------------------------------------------------------------------

def declaration(keyword: str, name: str, body: list[ast.Entry]) -> ast.Decl:
    return ast.Decl(keyword, NOWHERE, name, NOWHERE, ast.MapValue(tuple(body), NOWHERE), NOWHERE)


def setting_value(chain: list[_Setting]) -> ast.Value:
    """Settings in precedence order -> one value: mergekit falls through to the next
    scope when no filter of a scope matches, so the lower scopes' entries follow."""
    entries: list[tuple[str | None, ast.Value]] = []
    seen: set[str | None] = set()
    for setting in chain:
        for filter_, value in setting.entries:
            if filter_ not in seen:
                seen.add(filter_)
                entries.append((filter_, value))
        if setting.complete:
            break
    if len(entries) == 1 and entries[0][0] is None:
        return entries[0][1]
    return ast.MapValue(tuple(generated_entry("default" if f is None else f, v) for f, v in entries), NOWHERE)


def identifier(path: str) -> str:
    """A readable name from a path's last component: [A-Za-z_][A-Za-z0-9_]*."""
    last = os.path.basename(os.path.normpath(path.replace("\\", "/")))
    name = re.sub(r"[^A-Za-z0-9_]+", "_", last).strip("_")
    if not name or last in (".", ".."):
        name = "model"
    if name[0].isdigit():
        name = "m_" + name
    if name in RESERVED_NAMES:
        name += "_"
    return name


def unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}_{n}" in taken:
        n += 1
    return f"{name}_{n}"
