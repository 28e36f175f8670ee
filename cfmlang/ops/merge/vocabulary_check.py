"""Checking a merge's `tokenizer:` (the output vocabulary and per-token rules) and
`chat_template:`. Tokenizer files are read here (they are not weights); the output
vocabulary's size fixes the shapes of the embeddings and LM head before any weight is
read."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from cfmlang.compiler.ir import ArchInfo, ModelNode, TensorSpec, TokenRule, TokenSource, VocabularyPlan
from cfmlang.diagnostics import did_you_mean, error
from cfmlang.frontend import ast
from cfmlang.ops.merge import chat_templates
from cfmlang.ops.merge.vocabulary import (POLICIES, Member, VocabularyError, has_tokenizer, padded,
                                          vocabularies)

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
RULE_KEYS = ("source", "force")
SOURCE_KINDS = ("model_token", "zero", "mean")
VOCAB_ROLES = ("embed", "lm_head")


def vocabulary_tensors(arch: ArchInfo) -> set[str]:
    """The tensors with one row per token: embeddings and LM head (weight and bias)."""
    layout = arch.layout
    return {t.name for t in arch.tensors
            if layout and layout.role_of(t.name) in VOCAB_ROLES and t.shape and t.shape[0] == arch.vocab_size}


def tokenizer_folder(node) -> Path | None:
    """Where a model node's tokenizer lies before compiling (None: only known once built)."""
    if not isinstance(node, ModelNode) or node.source.kind == "gguf":
        return None
    path = Path(node.source.path)
    return path if node.source.kind == "hf" else path.parent


def check_vocabulary(checker, decl: ast.Decl, entry: ast.Entry, base: str | None, models: list[str],
                     arch: ArchInfo) -> tuple[VocabularyPlan, ArchInfo] | None:
    """The merge's vocabulary plan and its output architecture (vocabulary tensors
    resized), or None after reporting why not. `models`: the inputs, in order."""
    body = entry.value
    if isinstance(body, ast.Ref):
        body = ast.MapValue((ast.Entry("source", entry.key_span, body),), body.span)
    if not isinstance(body, ast.MapValue):
        checker.problems.append(error("E033", f"`tokenizer` must be base, union, an input's name or a map, "
                                      f"not {ast.describe(body)}", body.span,
                                      "e.g. `tokenizer: union` or `tokenizer: {source: base, pad_to_multiple_of: 64}`"))
        return None
    before = len(checker.problems)
    checker.unknown_keys(body, TOKENIZER_KEYS, f"the tokenizer of merge `{decl.name}`")
    names = ([base] if base else []) + [m for m in models if m != base]
    source = _source(checker, body.get("source"), names, body.span)
    multiple = _pad(checker, body.get("pad_to_multiple_of"))
    rules = _rules(checker, body.get("tokens"), names)
    if len(checker.problems) > before or source is None:
        return None
    if checker.layout_of(names[0], "aligning vocabularies", entry.key_span) is None:
        return None
    members = _members(checker, names, entry.key_span)
    if members is None:
        return None
    try:
        vocab = vocabularies(source, members, tuple(r.token for r in rules))
    except VocabularyError as exc:
        checker.problems.append(error("E294", str(exc), entry.key_span,
                                      "save the tokenizer again with transformers (a fast tokenizer)"))
        return None
    if not _rules_apply(checker, body.get("tokens"), rules, vocab, names):
        return None
    plan = VocabularyPlan(source, tuple(rules), multiple, padded(len(vocab.output), multiple))
    return plan, resized(arch, plan.vocab_size)


def resized(arch: ArchInfo, vocab_size: int) -> ArchInfo:
    rows = vocabulary_tensors(arch)
    tensors = tuple(TensorSpec(t.name, (vocab_size,) + t.shape[1:], t.dtype) if t.name in rows else t
                    for t in arch.tensors)
    return dataclasses.replace(arch, vocab_size=vocab_size, tensors=tensors)


def _source(checker, entry: ast.Entry | None, names: list[str], span) -> str | None:
    if entry is None:
        return "union"   # mergekit's default
    value = entry.value
    choices = list(POLICIES) + names
    if not (isinstance(value, ast.Ref) and value.is_plain):
        checker.problems.append(error("E033", f"the tokenizer source must be a name, not {ast.describe(value)}",
                                      value.span, f"one of: {', '.join(choices)}"))
        return None
    if value.name in POLICIES or value.name in names:
        return value.name
    inputs = ", ".join(names)
    checker.problems.append(error(
        "E290", f"tokenizer source `{value.name}` is not an input of this merge", value.span,
        did_you_mean(value.name, choices) or f"`base`, `union`, or one of the merged models: {inputs}"))
    return None


def _pad(checker, entry: ast.Entry | None) -> int | None:
    if entry is None:
        return None
    value = entry.value
    if isinstance(value, ast.Number) and isinstance(value.value, int) and value.value > 0:
        return value.value
    checker.problems.append(error("E032", "`pad_to_multiple_of` must be a positive integer", value.span,
                                  "e.g. `pad_to_multiple_of: 64`"))
    return None


def _rules(checker, entry: ast.Entry | None, names: list[str]) -> list[TokenRule]:
    if entry is None:
        return []
    if not isinstance(entry.value, ast.MapValue):
        checker.problems.append(error("E033", f"`tokens` must map tokens to rules, not {ast.describe(entry.value)}",
                                      entry.value.span, 'e.g. `tokens: {"<|im_start|>": {source: chat}}`'))
        return []
    rules = []
    for item in entry.value.entries:
        rule = _rule(checker, item, names)
        if rule is not None:
            rules.append(rule)
    return rules


def _rule(checker, item: ast.Entry, names: list[str]) -> TokenRule | None:
    value = item.value
    example = f'e.g. `"{item.key}": {{source: MODEL}}` or `{{source: {{kind: zero}}}}`'
    if not isinstance(value, ast.MapValue):
        checker.problems.append(error("E033", f"the rule of token `{item.key}` must be a map, not "
                                      f"{ast.describe(value)}", value.span, example))
        return None
    checker.unknown_keys(value, RULE_KEYS, f"the rule of token `{item.key}`")
    force = checker.flag(value, "force")
    source_entry = value.get("source")
    if source_entry is None:
        checker.problems.append(error("E014", f"the rule of token `{item.key}` needs a `source:`", value.span, example))
        return None
    source = _token_source(checker, source_entry.value, names, item.key)
    return None if source is None or force is None else TokenRule(item.key, source, force)


def _token_source(checker, value: ast.Value, names: list[str], token: str) -> TokenSource | None:
    if isinstance(value, ast.Ref) and value.is_plain:
        return TokenSource("model", value.name) if _known(checker, value.name, value.span, names) else None
    if not isinstance(value, ast.MapValue):
        checker.problems.append(error("E033", f"the source of token `{token}` must be a model name or a map, "
                                      f"not {ast.describe(value)}", value.span,
                                      "e.g. `{kind: zero}` or `{kind: model_token, model: a, token: \"<s>\"}`"))
        return None
    checker.unknown_keys(value, ("kind", "model", "token", "token_id"), f"the source of token `{token}`")
    kind = value.get("kind")
    word = kind.value.name if kind and isinstance(kind.value, ast.Ref) and kind.value.is_plain else None
    if word not in SOURCE_KINDS:
        checker.problems.append(error("E032", f"the source of token `{token}` needs `kind:` "
                                      f"{', '.join(SOURCE_KINDS)}", (kind.value if kind else value).span,
                                      (did_you_mean(word, SOURCE_KINDS) if word else "") or
                                      "or name a model: `source: MODEL`"))
        return None
    if word != "model_token":
        return TokenSource(word)
    return _model_token(checker, value, names, token)


def _model_token(checker, value: ast.MapValue, names: list[str], token: str) -> TokenSource | None:
    model, text, number = value.get("model"), value.get("token"), value.get("token_id")
    if model is None or not (isinstance(model.value, ast.Ref) and model.value.is_plain) or \
            (text is None) == (number is None):
        checker.problems.append(error("E032", f"the `model_token` source of `{token}` needs `model:` and one of "
                                      "`token:` or `token_id:`", value.span,
                                      'e.g. `{kind: model_token, model: a, token: "<s>"}`'))
        return None
    if not _known(checker, model.value.name, model.value.span, names):
        return None
    if text is not None and not isinstance(text.value, ast.String):
        checker.problems.append(error("E032", "`token` must be a string", text.value.span))
        return None
    if number is not None and not (isinstance(number.value, ast.Number) and isinstance(number.value.value, int)
                                   and number.value.value >= 0):
        checker.problems.append(error("E032", "`token_id` must be a non-negative integer", number.value.span))
        return None
    return TokenSource("model_token", model.value.name, text.value.value if text else None,
                       number.value.value if number else None)


def _known(checker, name: str, span, names: list[str]) -> bool:
    if name in names:
        return True
    checker.problems.append(error("E290", f"`{name}` is not an input of this merge", span,
                                  did_you_mean(name, names) or f"the merged models are: {', '.join(names)}"))
    return False


def _members(checker, names: list[str], span) -> tuple[Member, ...] | None:
    members = []
    for name in names:
        node = checker.nodes[name]
        folder = tokenizer_folder(node)
        if folder is None:
            checker.problems.append(error(
                "E291", f"the tokenizer of `{name}` is not known before compiling", span,
                f"compile `{name}` first and merge its artifact (`source: hf \"DIR\"`)"
                if not isinstance(node, ModelNode) else
                "convert the GGUF file to a model directory with its tokenizer (save_pretrained)"))
            return None
        if not has_tokenizer(folder):
            checker.problems.append(error("E291", f"`{name}` has no tokenizer (looked in {folder})", span,
                                          "save the model's tokenizer beside it: tokenizer.save_pretrained(DIR)"))
            return None
        members.append(Member(name, str(folder), node.arch.vocab_size))
    return tuple(members)


def _rules_apply(checker, entry, rules: list[TokenRule], vocab, names: list[str]) -> bool:
    """Each rule's source must hold what it names (reported at the rule)."""
    spans = {e.key: e.key_span for e in entry.value.entries} if entry else {}
    ok = True
    for rule in rules:
        problem = _rule_problem(rule, vocab, names)
        if problem:
            ok = False
            checker.problems.append(error("E292", problem[0], spans.get(rule.token), problem[1]))
    return ok


def _rule_problem(rule: TokenRule, vocab, names: list[str]) -> tuple[str, str] | None:
    source, token = rule.source, rule.token
    having = [m for m in names if vocab.present(m, token)]
    where = (f"it is in {', '.join(having)}" if having else
             "no merged model has it: give it `source: {kind: zero}` or a `model_token` source")
    if source.kind == "model" and not vocab.present(source.model, token):
        return f"token `{token}` is not in the vocabulary of `{source.model}`", where
    if source.kind == "mean" and not having:
        return f"token `{token}` has no rows to average: no merged model has it", where
    if source.kind == "model_token":
        rows = next(m.vocab_size for m in vocab.members if m.name == source.model)
        if source.token is not None and source.token not in vocab.originals[source.model]:
            return (f"token `{source.token}` is not in the vocabulary of `{source.model}`",
                    "name a token of that model, or its id with `token_id:`")
        row = source.token_id if source.token_id is not None else vocab.originals[source.model][source.token]
        if row >= rows:
            return (f"token id {row} is beyond the {rows} embedding rows of `{source.model}`",
                    f"ids of `{source.model}` run from 0 to {rows - 1}")
    return None


# ---- chat templates -----------------------------------------------------------------------

def check_chat_template(checker, entry: ast.Entry, names: list[str], base_dir: Path) -> str | None:
    """The template text a merge's `chat_template:` names: a built-in, an input's own
    (`auto`: the one most inputs share), an inline Jinja string, or a file."""
    value = entry.value
    if isinstance(value, ast.String):
        if "{" in value.value:
            return value.value
        path = Path(value.value) if Path(value.value).is_absolute() else (base_dir / value.value).resolve()
        if not path.is_file():
            checker.problems.append(error("E293", f"chat template file `{value.value}` does not exist "
                                          f"(looked in {path})", value.span,
                                          f"built-in templates: {', '.join(chat_templates.BUILT_IN)}"))
            return None
        return path.read_text(encoding="utf-8")
    choices = list(chat_templates.BUILT_IN) + ["auto"] + names
    if not (isinstance(value, ast.Ref) and value.is_plain):
        checker.problems.append(error("E033", f"`chat_template` must be a name or a string, not {ast.describe(value)}",
                                      value.span, f"one of: {', '.join(choices)}, or a file path"))
        return None
    if value.name in chat_templates.BUILT_IN:
        return chat_templates.BUILT_IN[value.name]
    if value.name == "auto":
        return _plurality(checker, names, value.span)
    if value.name not in names:
        checker.problems.append(error("E293", f"unknown chat template `{value.name}`", value.span,
                                      did_you_mean(value.name, choices) or
                                      f"a built-in ({', '.join(chat_templates.BUILT_IN)}), `auto`, an input "
                                      "of this merge, or a file path in quotes"))
        return None
    template = _model_template(checker.nodes[value.name])
    if template is None:
        checker.problems.append(error("E293", f"`{value.name}` has no chat template", value.span,
                                      f"built-in templates: {', '.join(chat_templates.BUILT_IN)}"))
    return template


def template_tokenizer(checker, name: str, span) -> bool:
    """A chat template is written into the tokenizer of `name` (the merge's first model):
    a model directory must hold one (another statement's output is checked when built)."""
    folder = tokenizer_folder(checker.nodes[name])
    if folder is None or has_tokenizer(folder):
        return True
    checker.problems.append(error("E291", f"`{name}` has no tokenizer to write the chat template into "
                                  f"(looked in {folder})", span,
                                  "save the model's tokenizer beside it: tokenizer.save_pretrained(DIR)"))
    return False


def _model_template(node) -> str | None:
    """A source model's own chat template (a GGUF file's from its metadata)."""
    if isinstance(node, ModelNode) and node.source.kind == "gguf":
        return chat_templates.of_gguf(Path(node.source.path))
    folder = tokenizer_folder(node)
    return None if folder is None else chat_templates.of_folder(folder)


def _plurality(checker, names: list[str], span) -> str | None:
    found = [t.strip() for t in (_model_template(checker.nodes[n]) for n in names) if t]
    if not found:
        checker.problems.append(error("E293", "no merged model has a chat template to choose", span,
                                      f"name a built-in: {', '.join(chat_templates.BUILT_IN)}"))
        return None
    return Counter(found).most_common(1)[0][0]


def vocabulary_manifest(node) -> dict:
    """The merge's `tokenizer` and `chat_template` entries in cfm.json (none when unset)."""
    entry: dict = {}
    plan = node.vocabulary
    if plan is not None:
        entry["tokenizer"] = {
            "source": plan.source, "vocab_size": plan.vocab_size, "pad_to_multiple_of": plan.pad_to_multiple_of,
            "tokens": {r.token: {"source": {k: v for k, v in dataclasses.asdict(r.source).items() if v is not None},
                                 "force": r.force} for r in plan.tokens}}
    if node.chat_template is not None:
        entry["chat_template"] = node.chat_template
    return entry
