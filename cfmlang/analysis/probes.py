"""Probe sets: texts grouped by ability, read from a directory, and their token ids.

A probe directory holds one UTF-8 file per ability, `ABILITY.txt`, whose prompts are
separated by lines holding only `---`. Abilities are ordered by file name. The seven
shipped sets (coding, ethics, knowledge, linguistic, math, translation, writing) live in
`cfmlang/analysis/probes/`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cfmlang.diagnostics import CompileError, Diagnostic, error, warning
from cfmlang.io.datafile import read_data_text

SHIPPED = Path(__file__).parent / "probes"
SEPARATOR = re.compile(r"^---[ \t]*$", re.MULTILINE)
ABILITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
PROBE_TOKENS = 128       # tokens kept per prompt by default
MIN_PROMPTS = 2          # average precision needs positives and negatives
ADVISED_PROMPTS = 40     # below this FuncScores are noisy (W061)


@dataclass(frozen=True)
class ProbeTexts:
    """Prompts per ability, in the order of `abilities`."""

    source: str
    abilities: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]

    def limited(self, per_ability: int | None) -> ProbeTexts:
        if per_ability is None:
            return self
        return ProbeTexts(self.source, self.abilities, tuple(p[:per_ability] for p in self.prompts))


@dataclass(frozen=True)
class Probes:
    """Tokenised prompts: `labels[i]` indexes `abilities` for `sequences[i]`."""

    abilities: tuple[str, ...]
    sequences: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]

    def subset(self, indices) -> Probes:
        return Probes(self.abilities, tuple(self.sequences[i] for i in indices),
                      tuple(self.labels[i] for i in indices))

    def first_per_ability(self, count: int) -> Probes:
        seen = [0] * len(self.abilities)
        keep = []
        for index, label in enumerate(self.labels):
            if seen[label] < count:
                seen[label] += 1
                keep.append(index)
        return self.subset(keep)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def split_prompts(text: str) -> tuple[str, ...]:
    return tuple(p.strip("\n") for p in SEPARATOR.split(text) if p.strip())


def read_probes(folder: Path | None = None) -> tuple[ProbeTexts, list[Diagnostic]]:
    """The probe set in `folder` (the shipped one by default) and its warnings.

    Raises CompileError (E162) when the set cannot serve the analysis."""
    folder = SHIPPED if folder is None else Path(folder)
    where = "the shipped probes" if folder == SHIPPED else str(folder)
    if not folder.is_dir():
        raise CompileError([error("E162", f"probe directory `{folder}` does not exist", None,
                                  "pass a directory holding one ABILITY.txt file per ability")])
    files = sorted(folder.glob("*.txt"))
    problems, warnings, prompts = [], [], []
    for path in files:
        if not ABILITY_NAME.match(path.stem):
            problems.append(error("E162", f"`{path.name}`: ability names are letters, digits, "
                                  "`_` and `-`, starting with a letter", None, "rename the file"))
            continue
        try:
            found = split_prompts(read_data_text(path))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(error("E162", f"cannot read `{path}`: {exc}", None,
                                  "probe files are UTF-8 text"))
            continue
        if len(found) < MIN_PROMPTS:
            problems.append(error("E162", f"`{path}` holds {len(found)} prompt(s); each ability "
                                  f"needs at least {MIN_PROMPTS}", None,
                                  "separate prompts with a line holding only `---`"))
        elif len(found) < ADVISED_PROMPTS:
            warnings.append(warning("W061", f"ability `{path.stem}` has only {len(found)} prompts; "
                                    f"functional scores are noisy below {ADVISED_PROMPTS}"))
        prompts.append(found)
    if len(files) < 2:
        problems.append(error("E162", f"{where} define {len(files)} abilit{'y' if len(files) == 1 else 'ies'}; "
                              "the analysis needs at least 2", None,
                              f"add one ABILITY.txt file per ability to {folder}"))
    if problems:
        raise CompileError(problems)
    return ProbeTexts(where, tuple(p.stem for p in files), tuple(prompts)), warnings


def tokenize(texts: ProbeTexts, tokenizer, max_tokens: int) -> tuple[Probes, list[Diagnostic]]:
    """Token ids of every prompt (at most `max_tokens` each) and a warning on truncation."""
    sequences, labels, truncated = [], [], 0
    for label, prompts in enumerate(texts.prompts):
        for prompt in prompts:
            ids = tuple(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            truncated += len(ids) > max_tokens
            sequences.append(ids[:max_tokens])
            labels.append(label)
    short = sum(len(s) < 2 for s in sequences)
    if short:
        raise CompileError([error("E162", f"{short} prompt(s) of {texts.source} tokenise to fewer "
                                  "than 2 tokens; there is no next token to predict", None,
                                  "write prompts of at least a few words")])
    notes = [warning("W062", f"{truncated} prompt(s) were cut to {max_tokens} tokens", None,
                     "raise --max-tokens to keep them whole")] if truncated else []
    return Probes(texts.abilities, tuple(sequences), tuple(labels)), notes
