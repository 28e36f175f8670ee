"""Merged vocabularies: the output tokenizer of a merge and each input's embedding rows
aligned to it, with mergekit 0.1.5's semantics (`tokenizer_source` / `tokenizer:`).

- The output tokenizer is the base's (`base`: the merge's `base:`, else its first input),
  a named input's, or the union of every input's (`union`): the base's tokenizer with
  every other token added after it, regular tokens first and then the inputs' added
  tokens with their attributes (special, lstrip, normalized ...; the first input that
  adds a token decides them). Entries ids at or beyond a model's `vocab_size` are not
  part of its vocabulary (the base's tokenizer is stripped of them).
- Each input's vocabulary tensors (embeddings, LM head: the tensors whose role is
  `embed` or `lm_head`) get one row per output token: its own row where it has the
  token; otherwise the row of the only input that has it, the base's row when the base
  has it, the mean of the inputs that have it, or zeros when none has it. A rule of
  `tokens:` replaces that choice per token (`force` also where the input has it). Rows
  added by `pad_to_multiple_of` are each input's mean row.

mergekit visits tokens in the order of hash tables (Python sets of models, the Rust
vocabulary map), so the ids it gives added tokens change from run to run; here the new
tokens come in a fixed order: inputs in the order of the merge (base first), each
input's tokens by id.
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from cfmlang.compiler.ir import TokenRule, TokenSource, VocabularyPlan
from cfmlang.io.weights import SUPPORT_FILES

POLICIES = ("base", "union")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""Files any one of which makes a folder hold a tokenizer."""


class VocabularyError(Exception):
    """A tokenizer that cannot take part in a vocabulary merge (reported as E294)."""


@dataclass(frozen=True)
class Member:
    """One model of a vocabulary merge: its name, tokenizer folder and vocab_size."""

    name: str
    folder: str
    vocab_size: int


@dataclass(frozen=True)
class Vocabularies:
    """What building the output tokenizer found: each member's vocabulary (token ->
    row, rows below its vocab_size only) and the output's (token -> id)."""

    members: tuple[Member, ...]
    own: dict
    output: dict
    originals: dict

    def present(self, name: str, token: str) -> bool:
        return token in self.own[name]


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(folder, use_fast=True)
    except Exception as exc:   # transformers raises many kinds for unreadable files
        raise VocabularyError(f"the tokenizer in {folder} cannot be loaded: {exc}") from None


def stripped(tokenizer, vocab_size: int, folder: str):
    """The tokenizer without the entries whose id is `vocab_size` or more (padding rows
    a tokenizer lists but the model has no row for)."""
    import tokenizers

    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model["type"] not in ("BPE", "WordLevel", "WordPiece"):
        raise VocabularyError(f"the tokenizer in {folder} lists {len(unused)} tokens beyond the model's "
                              f"vocab_size {vocab_size}, and a {model['type']} vocabulary cannot be cut")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    model["vocab"] = {tok: i for tok, i in model["vocab"].items() if tok not in unused}
    if "merges" in model:
        model["merges"] = [m for m in model["merges"]
                           if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _own_vocabulary(tokenizer, vocab_size: int) -> dict[str, int]:
    return {tok: i for tok, i in tokenizer.get_vocab().items() if i < vocab_size}


def _by_id(vocab: dict[str, int]) -> list[str]:
    return [tok for tok, _ in sorted(vocab.items(), key=lambda item: item[1])]


def output_tokenizer(plan_source: str, members: tuple[Member, ...], extra: tuple[str, ...]):
    """The output tokenizer and what it was built from. `members[0]` is the base."""
    base = members[0]
    loaded = {m.name: load_tokenizer(m.folder) for m in members}
    loaded[base.name] = stripped(loaded[base.name], base.vocab_size, base.folder)
    originals = {m.name: dict(loaded[m.name].get_vocab()) for m in members}
    own = {m.name: _own_vocabulary(loaded[m.name], m.vocab_size) for m in members}
    if plan_source == "base":
        out = load_tokenizer(base.folder)
        out = stripped(out, base.vocab_size, base.folder)
    elif plan_source == "union":
        out = _union(loaded, members, own)
    else:
        out = load_tokenizer(next(m.folder for m in members if m.name == plan_source))
    existing = set(out.get_vocab())
    new = [tok for tok in dict.fromkeys(extra) if tok not in existing]
    if new:
        out.add_tokens(new)
    return out, Vocabularies(members, own, dict(out.get_vocab()), originals)


def _union(loaded: dict, members: tuple[Member, ...], own: dict):
    """The base's tokenizer with every other member's tokens added after its own."""
    added: dict[str, object] = {}
    for m in members:
        for i, info in sorted(loaded[m.name].added_tokens_decoder.items()):
            if i < m.vocab_size:
                added.setdefault(info.content, info)
    base = members[0]
    out = load_tokenizer(base.folder)
    out = stripped(out, base.vocab_size, base.folder)
    known = set(own[base.name])
    regular = [tok for m in members[1:] for tok in _by_id(own[m.name])
               if tok not in added and tok not in known]
    regular = list(dict.fromkeys(regular))
    if regular:
        out.add_tokens(regular)
    if added:
        out.add_tokens(list(added.values()))
    return out


@functools.lru_cache(maxsize=16)
def _vocabularies(source: str, members: tuple[Member, ...], extra: tuple[str, ...],
                  stamps: tuple) -> Vocabularies:
    return output_tokenizer(source, members, extra)[1]


def vocabularies(source: str, members: tuple[Member, ...], extra: tuple[str, ...]) -> Vocabularies:
    """The members' and the output's vocabularies (remembered per tokenizer files'
    modification times, so re-checking an unchanged program reads no tokenizer)."""
    stamps = tuple((Path(m.folder) / name).stat().st_mtime_ns if (Path(m.folder) / name).is_file() else 0
                   for m in members for name in SUPPORT_FILES)
    return _vocabularies(source, members, extra, stamps)


def padded(size: int, multiple: int | None) -> int:
    if multiple and size % multiple:
        return (size // multiple + 1) * multiple
    return size


# ---- rows -------------------------------------------------------------------------------

def align(vocab: Vocabularies, plan: VocabularyPlan, tensors: dict[str, torch.Tensor],
          order: tuple[str, ...], base: str | None) -> dict[str, torch.Tensor]:
    """Each model's vocabulary tensor (rows = its tokens) with one row per output token.
    `order` is the models in mergekit's gather order (inputs, then the base)."""
    output = vocab.output
    rows = plan.vocab_size
    dtype = tensors[order[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    shape = tensors[order[0]].shape[1:]
    rules = {r.token: r for r in plan.tokens}
    chosen, averaged = _sources(vocab, output, order, base, rules)
    defaults: dict[str, torch.Tensor] = {}
    for token, token_id in output.items():
        rule = rules.get(token)
        if not (rule and rule.force) and all(vocab.present(m, token) for m in order):
            continue
        if token in averaged:
            defaults[token] = _mean(vocab, tensors, order, token, shape, dtype)
        elif token in chosen:
            defaults[token] = _rule_row(vocab, tensors, chosen[token], token, order, shape, dtype)
    result = {}
    for model in order:
        new = torch.zeros((rows, *shape), dtype=dtype)
        own = vocab.own[model]
        kept = [(token_id, own[token]) for token, token_id in output.items()
                if token in own and not (token in rules and rules[token].force)]
        if kept:
            targets, sources = zip(*kept)
            new[list(targets)] = tensors[model][list(sources)].to(dtype)
        for token, row in defaults.items():
            if token not in own or rules.get(token, _UNFORCED).force:
                new[output[token]] = row
        if rows > len(output):
            new[len(output):] = torch.mean(new[:len(output)], dim=0)
        result[model] = new
    return result


_UNFORCED = TokenRule("", None)


def _sources(vocab: Vocabularies, output: dict, order: tuple[str, ...], base: str | None,
             rules: dict[str, TokenRule]):
    """The source of each token some model lacks (rules given first), and the tokens to
    average over the models that have them."""
    chosen = {token: rule.source for token, rule in rules.items()}
    averaged = set()
    for token in output:
        if token in chosen:
            continue
        having = [m for m in order if vocab.present(m, token)]
        if len(having) == 1:
            chosen[token] = TokenSource("model", having[0])
        elif not having:
            chosen[token] = TokenSource("zero")
        elif base in order and vocab.present(base, token):
            chosen[token] = TokenSource("model", base)
        else:
            averaged.add(token)
    averaged |= {t for t, s in chosen.items() if s.kind == "mean"}
    return chosen, averaged


def _mean(vocab, tensors, order, token, shape, dtype) -> torch.Tensor:
    total = torch.zeros(shape, dtype=dtype)
    count = 0
    for model in order:
        if vocab.present(model, token):
            total = total + tensors[model][vocab.own[model][token]]
            count += 1
    return total / count if count else total


def _rule_row(vocab, tensors, source, token, order, shape, dtype) -> torch.Tensor:
    if source.kind == "zero":
        return torch.zeros(shape, dtype=tensors[order[0]].dtype)
    if source.kind == "model_token":
        row = source.token_id if source.token_id is not None else vocab.originals[source.model][source.token]
        return tensors[source.model][row]
    return tensors[source.model][vocab.own[source.model][token]]


# ---- files ------------------------------------------------------------------------------

def write_tokenizer(folder: Path, tokenizer, chat_template: str | None) -> None:
    """The tokenizer files (as the installed transformers writes them), with the chat
    template when one is given."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))
    settings_file = folder / "tokenizer_config.json"
    if chat_template is not None and settings_file.is_file():
        # transformers 5 writes the template to chat_template.jinja only; earlier versions
        # (and other readers) look for it in tokenizer_config.json
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        if "chat_template" not in settings:
            settings["chat_template"] = chat_template
            settings_file.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                     encoding="utf-8")


def support_folder(source: Path, config: dict, tokenizer, chat_template: str | None) -> Path:
    """A new folder with `config` and `tokenizer` (replacing the tokenizer files of
    `source`) and the other support files of `source` (generation config)."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="cfm-vocab-"))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
    write_tokenizer(folder, tokenizer, chat_template)
    return folder


def with_vocab_size(config: dict, key: str, section: str | None, size: int) -> dict:
    config = json.loads(json.dumps(config))
    target = config.get(section, config) if section else config
    target[key] = size
    return config


# ---- a merge's vocabulary while it runs ---------------------------------------------------

class MergedVocabulary:
    """The output tokenizer of one merge node, built on first use from its inputs'
    tokenizer folders, and its inputs' vocabulary tensors aligned to it."""

    def __init__(self, node, providers: dict, first, rows: set[str], fail):
        self.node, self.providers, self.first, self.rows, self.fail = node, providers, first, rows, fail
        self._built = None
        self._folder: Path | None = None
        self._held: tuple[str, dict | None] = ("", None)

    def members(self) -> tuple[Member, ...]:
        node = self.node
        names = ([node.base] if node.base else []) + [i.model for i in node.inputs if i.model != node.base]
        keys = node.arch.layout.keys
        return tuple(Member(n, str(self.providers[n].support_dir), _config_vocab(self.providers[n].config, keys))
                     for n in names)

    def built(self):
        if self._built is None:
            plan = self.node.vocabulary
            try:
                if plan is None:
                    self._built = (load_tokenizer(str(self.first.support_dir)), None)
                else:
                    self._built = output_tokenizer(plan.source, self.members(), tuple(r.token for r in plan.tokens))
            except VocabularyError as exc:
                raise self.fail(str(exc)) from None
            if plan is not None and padded(len(self._built[1].output), plan.pad_to_multiple_of) != plan.vocab_size:
                raise self.fail(f"the inputs' tokenizers changed after checking: the output vocabulary has "
                                f"{len(self._built[1].output)} tokens, not {plan.vocab_size}")
        return self._built

    def config(self, config: dict) -> dict:
        if self.node.vocabulary is None:
            return config
        keys = self.node.arch.layout.keys
        return with_vocab_size(config, keys.vocab_size, keys.section, self.node.vocabulary.vocab_size)

    def support_dir(self, config: dict) -> Path:
        if self._folder is None:
            self._folder = support_folder(Path(self.first.support_dir), config, self.built()[0],
                                          self.node.chat_template)
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder

    def aligns(self, name: str) -> bool:
        return self.node.vocabulary is not None and name in self.rows

    def aligned(self, name: str, load) -> dict[str, torch.Tensor]:
        """Every model's tensor `name` with one row per output token (the last one kept)."""
        if self._held[0] != name:
            self._held = ("", None)
            node = self.node
            order = tuple(i.model for i in node.inputs) + ((node.base,) if node.base else ())
            tensors = {m: load(self.providers[m], name, None) for m in dict.fromkeys(order)}
            self._held = (name, align(self.built()[1], node.vocabulary, tensors, tuple(dict.fromkeys(order)),
                                      node.base))
        return self._held[1]


def _config_vocab(config: dict, keys) -> int:
    section = config.get(keys.section, config) if keys.section else config
    return int(section[keys.vocab_size])
