"""Checking `update` statements: facts, neighbourhood prompts and options of knowledge
edits (`rome`, `memit`), and the selection and dataset of `finetune`. Facts, prompts and
datasets are data, read here (no weights are)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cfmlang.frontend import ast
from cfmlang.compiler.ir import ArchInfo, EditNode, Fact, FinetuneNode, ModelNode
from cfmlang.diagnostics import Span, did_you_mean, error, warning
from cfmlang.io.datafile import read_data_text
from cfmlang.ops.update.finetune import DataError, read_texts

EDIT_KEYS = ("method", "from", "facts", "neighbourhood", "seed", "description")
FACT_KEYS = ("prompt", "subject", "target", "target_new", "target_true", "paraphrases", "neighbourhood",
             "relation")
"""`target_new` is another name of `target` (CounterFact's records read as facts as they
are); `relation` is a label, ignored."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Located:
    """A value read from a data file, with where it was read (for messages)."""

    value: object
    where: str          # "" for values written in the .brick file itself
    span: Span


def edit_node(checker, decl: ast.Decl, body: ast.MapValue, method, base_dir: Path) -> EditNode | None:
    """The checked EditNode, or None after reporting every problem found."""
    option_keys = tuple(method.Options.model_fields)
    checker.unknown_keys(body, EDIT_KEYS + option_keys, f"update `{decl.name}` (method {method.name})")
    before = _errors(checker)
    source = _source(checker, decl, body)
    options_body = ast.MapValue(tuple(e for e in body.entries if e.key in option_keys), body.span)
    options = checker.validate(method.Options, options_body, body.span)
    seed = checker.seed(body.get("seed").value) if body.get("seed") else None
    facts = _facts(checker, decl, body, base_dir)
    neighbourhood = _neighbourhood(checker, decl, body, base_dir)
    if source is None or options is None:
        return None
    arch = checker.nodes[source].arch
    if options[method.layer_key] is None:
        options[method.layer_key] = method.default_layers(arch.num_layers)
    layers_ok = _layers_in_range(checker, method.layer_key, options, options_body, arch)
    if _errors(checker) > before or None in (facts, neighbourhood) or not layers_ok:
        return None
    if not _gated(checker, source, method.name, body.get("method").value.span) or \
            not _has_tokenizer(checker, source, body):
        return None
    return EditNode(decl.name, decl.span, method.name, source, facts, neighbourhood,
                    tuple(sorted(options.items())), seed, arch)


def _gated(checker, source: str, method: str, span) -> bool:
    """Edits write rank-one changes into an FFN's down projection (its input is the key,
    its output the value; ROME's GPT-2 and GPT-J had plain FFNs, Llama's are gated): E113
    for a family without a dense one stored `[out, in]` (MoE experts, GPT-2's Conv1D)."""
    layout = checker.layout_of(source, method, span)
    if layout is None:
        return False
    if layout.member("ffn.down") is None or layout.transposed:
        lacking = layout.lacking(f"{method} edits the down projection of a dense FFN")
        if layout.transposed:
            lacking = (f"{method} edits an FFN down projection stored `[out, in]`, but {layout.model_type} models "
                       "store theirs transposed (GPT-2's Conv1D layers)")
        checker.problems.append(error(
            "E113", lacking, span, f"{method} works on the families marked `yes` in docs/architectures.md"))
        return False
    return True


def _errors(checker) -> int:
    return sum(d.is_error for d in checker.problems)


def _source(checker, decl: ast.Decl, body: ast.MapValue) -> str | None:
    return checker.required_model_ref(body, "from", f"update `{decl.name}` needs `from:`", decl.name_span,
                                      "name the model to edit, e.g. `from: smol`", "`from` model")


# ---- facts ------------------------------------------------------------------------------

def _facts(checker, decl: ast.Decl, body: ast.MapValue, base_dir: Path) -> tuple[Fact, ...] | None:
    entry = body.get("facts")
    if entry is None:
        checker.problems.append(error(
            "E014", f"update `{decl.name}` needs `facts:`", decl.name_span,
            'list them: `facts: [{prompt: "The Eiffel Tower is in", subject: "Eiffel Tower", target: " Rome"}]`, '
            'or name a .jsonl file: `facts: "facts.jsonl"`'))
        return None
    items = _items(checker, entry.value, base_dir, "facts", _json_lines)
    if items is None:
        return None
    if not items:
        checker.problems.append(error("E032", "`facts` is empty", entry.value.span, "give at least one fact"))
        return None
    facts = [_fact(checker, item) for item in items]
    return tuple(facts) if None not in facts else None


def _items(checker, value: ast.Value, base_dir: Path, key: str, read_file) -> list[Located] | None:
    """The entries of a list written in the program, or of the data file a string names."""
    if isinstance(value, ast.ListValue):
        return [Located(item, "", getattr(item, "span", value.span)) for item in value.items]
    if isinstance(value, ast.String):
        path = (base_dir / value.value)
        try:
            return read_file(path, value.span)
        except _DataError as exc:
            checker.problems.append(error("E122", f"cannot read `{key}` from `{value.value}`: {exc}",
                                          value.span, exc.help))
            return None
    checker.problems.append(error("E033", f"`{key}` must be a list or a file name, not {ast.describe(value)}",
                                  value.span, f'e.g. `{key}: "{key}.jsonl"`'))
    return None


class _DataError(Exception):
    def __init__(self, message: str, help: str = ""):
        super().__init__(message)
        self.help = help


def _json_lines(path: Path, span: Span) -> list[Located]:
    """Every non-blank line of a .jsonl file, parsed."""
    lines = _read_lines(path)
    out = []
    for number, line in lines:
        try:
            out.append(Located(json.loads(line), f"{path.name}:{number}", span))
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep" \
                if isinstance(exc, RecursionError) else str(exc)
            raise _DataError(f"line {number} is not JSON ({reason})",
                             'write one JSON object per line: {"prompt": ..., "subject": ..., "target": ...}')
    return out


def _text_lines(path: Path, span: Span) -> list[Located]:
    """Every non-blank line of a text file (or the `prompt` of each line of a .jsonl)."""
    if path.suffix == ".jsonl":
        return [Located(item.value.get("prompt") if isinstance(item.value, dict) else item.value,
                        item.where, span) for item in _json_lines(path, span)]
    return [Located(line, f"{path.name}:{number}", span) for number, line in _read_lines(path)]


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = read_data_text(path)
    except FileNotFoundError:
        raise _DataError("no such file", "paths are relative to the .brick file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _DataError(str(exc)) from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _fact(checker, item: Located) -> Fact | None:
    """One fact from a map written in the program or an object read from a file."""
    fields = _fields(checker, item)
    if fields is None:
        return None
    if "target_new" in fields and "target" not in fields:
        fields["target"] = fields.pop("target_new")
    missing = [k for k in ("prompt", "subject", "target") if k not in fields]
    if missing:
        checker.problems.append(error("E014", f"{_at(item)}fact needs `{missing[0]}`", item.span,
                                      "a fact has `prompt`, `subject` and `target` (and optional `paraphrases`, "
                                      "`target_true`, `neighbourhood`)"))
        return None
    strings = {}
    for key in ("prompt", "subject", "target", "target_true"):
        if key not in fields:
            continue
        value, span = fields[key]
        if not isinstance(value, str) or not value.strip():
            checker.problems.append(error("E033", f"{_at(item)}`{key}` must be a non-empty string", span))
            return None
        strings[key] = value
    if strings["subject"] not in strings["prompt"]:
        checker.problems.append(error(
            "E120", f"{_at(item)}subject `{strings['subject']}` does not occur in the prompt "
            f"`{strings['prompt']}`", fields["subject"][1],
            "the edit keys on the subject's last token in the prompt: write it exactly as in the prompt"))
        return None
    paraphrases = _prompts(checker, item, fields.get("paraphrases"), "paraphrases")
    neighbourhood = _prompts(checker, item, fields.get("neighbourhood"), "neighbourhood")
    if paraphrases is None or neighbourhood is None:
        return None
    return Fact(strings["prompt"], strings["subject"], strings["target"], paraphrases, strings.get("target_true"),
                neighbourhood)


def _fields(checker, item: Located) -> dict[str, tuple[object, Span]] | None:
    """key -> (plain value, span) of a fact; unknown keys and non-maps are reported."""
    if isinstance(item.value, ast.MapValue):
        fields = {e.key: (_plain(e.value), e.value.span) for e in item.value.entries}
        key_spans = {e.key: e.key_span for e in item.value.entries}
    elif isinstance(item.value, dict):
        fields = {k: (v, item.span) for k, v in item.value.items()}
        key_spans = {k: item.span for k in item.value}
    else:
        kind = ast.describe(item.value) if not item.where else type(item.value).__name__
        checker.problems.append(error("E033", f"{_at(item)}a fact must be a map, not {kind}", item.span,
                                      '{prompt: "...", subject: "...", target: "..."}'))
        return None
    for key in fields:
        if key not in FACT_KEYS:
            checker.problems.append(error("E013", f"{_at(item)}unknown fact key `{key}`", key_spans[key],
                                          did_you_mean(key, FACT_KEYS) or f"fact keys: {', '.join(FACT_KEYS)}"))
            return None
    return fields


def _prompts(checker, item: Located, field, key: str) -> tuple[str, ...] | None:
    if field is None:
        return ()
    value, span = field
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        checker.problems.append(error("E033", f"{_at(item)}`{key}` must be a list of non-empty strings",
                                      span))
        return None
    return tuple(value)


def _plain(value: ast.Value):
    if isinstance(value, ast.String):
        return value.value
    if isinstance(value, ast.ListValue):
        return [_plain(v) for v in value.items]
    return value   # any other AST value: reported as the wrong kind


def _at(item: Located) -> str:
    return f"{item.where}: " if item.where else ""


# ---- neighbourhood, layers, tokenizer ----------------------------------------------------

def _neighbourhood(checker, decl: ast.Decl, body: ast.MapValue, base_dir: Path) -> tuple[str, ...] | None:
    entry = body.get("neighbourhood")
    if entry is None:
        checker.problems.append(warning(
            "W021", f"update `{decl.name}` has no `neighbourhood:` prompts: its report will not measure "
            "specificity", decl.name_span,
            'add prompts unrelated to the facts, e.g. `neighbourhood: "unrelated.txt"` (one a line)'))
        return ()
    items = _items(checker, entry.value, base_dir, "neighbourhood", _text_lines)
    if items is None:
        return None
    prompts = []
    for item in items:
        text = item.value.value if isinstance(item.value, ast.String) else item.value
        if not isinstance(text, str) or not text.strip():
            checker.problems.append(error("E033", f"{_at(item)}a neighbourhood prompt must be a non-empty string",
                                          item.span))
            return None
        prompts.append(text)
    return tuple(prompts)


def _layers_in_range(checker, key: str, options: dict, body: ast.MapValue, arch: ArchInfo) -> bool:
    layers = options[key] if isinstance(options[key], list) else [options[key]]
    bad = [layer for layer in layers if layer >= arch.num_layers]
    if bad:
        entry = body.get(key)
        checker.problems.append(error(
            "E121", f"layer {bad[0]} does not exist: the model has {arch.num_layers} layers",
            entry.value.span if entry else body.span, f"choose layers 0 to {arch.num_layers - 1}"))
    return not bad


def _has_tokenizer(checker, source: str, body: ast.MapValue) -> bool:
    """Edits tokenize prompts: the model's directory must carry a tokenizer (GGUF files
    always do)."""
    folder = support_folder(checker.nodes, source)
    if folder is None or any((folder / name).is_file() for name in TOKENIZER_FILES):
        return True
    checker.problems.append(error(
        "E123", f"`{source}` has no tokenizer: {folder} holds none of {', '.join(TOKENIZER_FILES)}",
        body.get("from").value.span, "save the tokenizer next to the weights (tokenizer.save_pretrained(dir))"))
    return False


def support_folder(nodes: dict, name: str) -> Path | None:
    """The directory whose config and tokenizer the node's output carries (None for GGUF,
    converted at compile time)."""
    node = nodes[name]
    while not isinstance(node, ModelNode):
        node = nodes[node.deps[0]]     # merges list their base first, like their executor
    if node.source.kind == "gguf":
        return None
    path = Path(node.source.path)
    return path if path.is_dir() else path.parent



# ---- finetune ---------------------------------------------------------------------------

FINETUNE_KEYS = ("method", "from", "train", "data", "seed", "description")
NEW_BLOCKS = "new_blocks"
"""`train: new_blocks` selects the layers a grow method added to the `from` model."""


def finetune_node(checker, decl: ast.Decl, body: ast.MapValue, method, base_dir: Path) -> FinetuneNode | None:
    option_keys = tuple(method.Options.model_fields)
    checker.unknown_keys(body, FINETUNE_KEYS + option_keys, f"update `{decl.name}` (method finetune)")
    before = _errors(checker)
    source = _source(checker, decl, body)
    options = checker.validate(method.Options, ast.MapValue(tuple(e for e in body.entries if e.key in option_keys),
                                                           body.span), body.span)
    seed = checker.seed(body.get("seed").value) if body.get("seed") else None
    data = _dataset(checker, decl, body, base_dir)
    prefixes = _selection(checker, decl, body, source) if source is not None else None
    if _errors(checker) > before or None in (source, options, data, prefixes):
        return None
    if not _has_tokenizer(checker, source, body):
        return None
    return FinetuneNode(decl.name, decl.span, source, prefixes, data, tuple(sorted(options.items())), seed,
                        checker.nodes[source].arch)


def _dataset(checker, decl: ast.Decl, body: ast.MapValue, base_dir: Path) -> str | None:
    entry = body.get("data")
    if entry is None:
        checker.problems.append(error("E014", f"update `{decl.name}` needs `data:`", decl.name_span,
                                      'name a text or .jsonl file (one {"text": ...} a line): `data: "train.txt"`'))
        return None
    if not isinstance(entry.value, ast.String):
        checker.problems.append(error("E033", f"`data` must be a file name, not {ast.describe(entry.value)}",
                                      entry.value.span, 'e.g. `data: "train.jsonl"`'))
        return None
    path = base_dir / entry.value.value
    try:
        read_texts(path)
    except DataError as exc:
        checker.problems.append(error("E122", f"cannot read `data` from `{entry.value.value}`: {exc}",
                                      entry.value.span, 'a text file, or .jsonl with one {"text": ...} a line; '
                                      "paths are relative to the .brick file"))
        return None
    return str(path.resolve())


def _selection(checker, decl: ast.Decl, body: ast.MapValue, source: str) -> tuple[str, ...] | None:
    """Tensor-name prefixes of the bricks `train:` selects (layers, or parts of layers)."""
    entry = body.get("train")
    if entry is None:
        checker.problems.append(error("E014", f"update `{decl.name}` needs `train:`", decl.name_span,
                                      f"select what to train, e.g. `train: {source}.layers[4]` or "
                                      f"`train: [{source}.layers[2:4].mlp]`"))
        return None
    arch = checker.nodes[source].arch
    if _names_new_blocks(checker, entry.value):
        return _new_blocks(checker, entry.value, source, arch)
    refs = entry.value.items if isinstance(entry.value, ast.ListValue) else (entry.value,)
    prefixes: list[str] = []
    for ref in refs:
        found = _selected(checker, ref, source, arch)
        if found is None:
            return None
        prefixes += [p for p in found if p not in prefixes]
    if not prefixes:
        checker.problems.append(error("E124", "`train` selects nothing", entry.value.span,
                                      f"e.g. `train: {source}.layers[4]`"))
        return None
    return tuple(prefixes)


def _names_new_blocks(checker, value: ast.Value) -> bool:
    return isinstance(value, ast.Ref) and value.is_plain and value.name == NEW_BLOCKS and NEW_BLOCKS not in checker.table


def _new_blocks(checker, value: ast.Ref, source: str, arch: ArchInfo) -> tuple[str, ...] | None:
    """`train: new_blocks`: the layers a grow method added to `source` (block_expand's
    copies, zeroed stack slices), as recorded in its architecture."""
    if not arch.new_layers:
        checker.problems.append(error("E124", f"`{source}` has no new blocks to train", value.span,
                                      "new_blocks are the layers a grow method added (e.g. `block_expand`); "
                                      f"select layers instead, e.g. `train: {source}.layers[4]`"))
        return None
    layout = checker.layout_of(source, "`train: new_blocks`", value.span)
    return None if layout is None else tuple(layout.layer_prefix(i) for i in arch.new_layers)


def _selected(checker, ref: ast.Value, source: str, arch: ArchInfo) -> list[str] | None:
    example = f"{source}.layers[4], {source}.layers[0:2].mlp"
    if not isinstance(ref, ast.Ref) or ref.name != source or not ref.accessors or \
            not isinstance(ref.accessors[0], ast.Attr) or ref.accessors[0].name != "layers" or \
            len(ref.accessors) < 2 or not isinstance(ref.accessors[1], ast.Index) or len(ref.accessors) > 3:
        what = ast.describe(ref) if not isinstance(ref, ast.Ref) else f"`{ref.text()}`"
        checker.problems.append(error("E124", f"cannot train {what}: `train` takes selections of layers of "
                                      f"the `from` model `{source}`", ref.span, f"e.g. {example}"))
        return None
    layers = _indices(checker, ref.accessors[1], arch)
    layout = checker.layout_of(source, "`train:`", ref.span)
    if layers is None or layout is None:
        return None
    part = ref.accessors[2].name + "." if len(ref.accessors) == 3 and isinstance(ref.accessors[2], ast.Attr) else ""
    prefixes = [f"{layout.layer_prefix(i)}{part}" for i in layers]
    names = [t.name for t in arch.tensors]
    if names and not all(any(n.startswith(p) for n in names) for p in prefixes):
        first = layout.layer_prefix(0)
        parts = sorted({n.removeprefix(first).split(".")[0] for n in names if n.startswith(first)})
        checker.problems.append(error("E124", f"`{ref.text()}` selects no tensor", ref.span,
                                      f"parts of a layer: {', '.join(parts)}"))
        return None
    return prefixes


def _indices(checker, index: ast.Index, arch: ArchInfo) -> list[int] | None:
    count = arch.num_layers
    if index.every:
        return list(range(count))
    if not index.is_slice:
        chosen = [index.start]
    else:
        chosen = list(range(index.start or 0, count if index.stop is None else index.stop))
    bad = [i for i in chosen if i >= count] or ([index.stop] if index.is_slice and (index.stop or 0) > count else [])
    if bad or not chosen:
        checker.problems.append(error("E121", f"layer selection `{_index_text(index)}` is outside the model's "
                                      f"{count} layers", index.span, f"choose layers 0 to {count - 1}"))
        return None
    return chosen


def _index_text(index: ast.Index) -> str:
    if not index.is_slice:
        return f"[{index.start}]"
    return f"[{'' if index.start is None else index.start}:{'' if index.stop is None else index.stop}]"
