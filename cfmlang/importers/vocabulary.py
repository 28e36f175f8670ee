"""`cfmc import` of mergekit's vocabulary and chat-template settings: `tokenizer_source`,
`tokenizer: {source, tokens, pad_to_multiple_of}` and `chat_template`, read from the YAML
into plain data (model paths kept) and written as a merge's `tokenizer:` and
`chat_template:` once every path has a declaration name."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cfmlang.frontend import ast
from cfmlang.frontend.format import NOWHERE, generated_entry, generated_ref
from cfmlang.ops.merge.chat_templates import BUILT_IN

POLICIES = ("union", "base")


@dataclass
class TokenizerSetting:
    """A mergekit tokenizer setting: `source` a policy or a model path; each token rule
    (token, source: a path or {kind, model, token, token_id}, force)."""

    source: str
    node: Any
    tokens: list[tuple[str, Any, bool, Any]] = field(default_factory=list)
    pad_to_multiple_of: int | None = None


def read_tokenizer(importer, top: dict) -> TokenizerSetting | None:
    """`tokenizer:` (which wins, as in mergekit) or `tokenizer_source:`."""
    if "tokenizer" in top:
        node = top["tokenizer"][1]
        body = importer.mapping(node, "`tokenizer`", ("source", "tokens", "pad_to_multiple_of"))
        if body is None:
            return None
        source = importer.string(body["source"][1], "the tokenizer source") if "source" in body else "union"
        setting = TokenizerSetting(source, body["source"][1] if "source" in body else node)
        if "pad_to_multiple_of" in body:
            pad = importer.scalar(body["pad_to_multiple_of"][1])
            if not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0:
                importer.cannot(body["pad_to_multiple_of"][1], "`pad_to_multiple_of` must be a positive integer")
                return None
            setting.pad_to_multiple_of = pad
        if "tokens" in body and not importer.is_null(body["tokens"][1]):
            rules = importer.mapping(body["tokens"][1], "`tokens`")
            for token, (key_node, value_node) in (rules or {}).items():
                rule = _rule(importer, token, value_node)
                if rule is None:
                    return None
                setting.tokens.append((token, rule[0], rule[1], key_node))
        return setting if source else None
    if "tokenizer_source" in top:
        node = top["tokenizer_source"][1]
        source = importer.string(node, "`tokenizer_source`")
        return TokenizerSetting(source, node) if source else None
    return None


def _rule(importer, token: str, node) -> tuple[Any, bool] | None:
    body = importer.mapping(node, f"the rule of token `{token}`", ("source", "force"))
    if body is None:
        return None
    force = importer.scalar(body["force"][1]) if "force" in body else False
    if not isinstance(force, bool):
        importer.cannot(body["force"][1], "`force` must be true or false")
        return None
    if "source" not in body or importer.is_null(body["source"][1]):
        importer.cannot(node, f"the rule of token `{token}` has no `source:`",
                        "mergekit fails on such a rule; give a model or `{kind: zero}`")
        return None
    value = body["source"][1]
    if not isinstance(value, importer.yaml.MappingNode):
        path = importer.string(value, "a token source")
        return None if path is None else (path, force)
    source = importer.mapping(value, "a token source", ("kind", "model", "token", "token_id"))
    if source is None:
        return None
    plain = {key: importer.scalar(v) for key, (_, v) in source.items()}
    if plain.get("kind") not in ("zero", "model_token"):
        importer.cannot(value, f"token source kind `{plain.get('kind')}`", "mergekit's kinds: zero, model_token")
        return None
    return plain, force


def read_chat_template(importer, node) -> tuple[str, str] | None:
    """("name", built-in or `auto`) or ("text", an inline template)."""
    text = importer.string(node, "`chat_template`")
    if text is None:
        return None
    if text in BUILT_IN or text == "auto":
        if text != "auto":
            importer.notes.append(f"`chat_template: {text}` is cfmlang's own `{text}` template, written "
                                  "independently of mergekit's: the format is the same, details may differ")
        return "name", text
    if "{" in text:
        return "text", text
    importer.cannot(node, f"chat template `{text}`",
                    f"cfmlang's built-in templates are {', '.join(BUILT_IN)}; give the template itself "
                    "(a Jinja string) instead")
    return None


def tokenizer_entry(importer, setting: TokenizerSetting, names: dict[str, str]) -> ast.Entry | None:
    """The merge's `tokenizer:` with model paths replaced by their names (E100 when a
    path is not one of the merge's models)."""
    source = setting.source if setting.source in POLICIES else _name(importer, setting.source, names, setting.node)
    if source is None:
        return None
    if not setting.tokens and setting.pad_to_multiple_of is None:
        return generated_entry("tokenizer", generated_ref(source))
    body = [generated_entry("source", generated_ref(source))]
    if setting.pad_to_multiple_of is not None:
        body.append(generated_entry("pad_to_multiple_of", ast.Number(setting.pad_to_multiple_of, NOWHERE)))
    rules = []
    for token, rule_source, force, node in setting.tokens:
        value = _rule_source(importer, rule_source, names, node)
        if value is None:
            return None
        rule = [generated_entry("source", value)] + ([generated_entry("force", ast.Bool(True, NOWHERE))] if force else [])
        rules.append(generated_entry(token, ast.MapValue(tuple(rule), NOWHERE)))
    if rules:
        body.append(generated_entry("tokens", ast.MapValue(tuple(rules), NOWHERE)))
    return generated_entry("tokenizer", ast.MapValue(tuple(body), NOWHERE))


def chat_template_entry(template: tuple[str, str]) -> ast.Entry:
    kind, value = template
    return generated_entry("chat_template", generated_ref(value) if kind == "name" else ast.String(value, NOWHERE))


def _rule_source(importer, source, names: dict[str, str], node) -> ast.Value | None:
    if isinstance(source, str):
        name = _name(importer, source, names, node)
        return None if name is None else generated_ref(name)
    entries = [generated_entry("kind", generated_ref(source["kind"]))]
    if source["kind"] == "model_token":
        name = _name(importer, str(source.get("model")), names, node)
        if name is None:
            return None
        entries.append(generated_entry("model", generated_ref(name)))
        if source.get("token") is not None:
            entries.append(generated_entry("token", ast.String(str(source["token"]), NOWHERE)))
        if source.get("token_id") is not None:
            entries.append(generated_entry("token_id", ast.Number(int(source["token_id"]), NOWHERE)))
    return ast.MapValue(tuple(entries), NOWHERE)


def _name(importer, path: str, names: dict[str, str], node) -> str | None:
    normal = {os.path.normpath(k): v for k, v in names.items()}
    found = names.get(path) or normal.get(os.path.normpath(path))
    if found is None:
        importer.cannot(node, f"the tokenizer model `{path}` is not one of the merged models",
                        "cfmlang takes tokenizers and token rows from the merge's own inputs")
    return found
