"""The edit report: what a knowledge edit did, measured on the model before and after.

- efficacy: the probability of each fact's target after its prompt, and whether greedy
  decoding now completes the prompt with the target;
- generalisation: the same on each fact's paraphrases;
- specificity: on neighbourhood prompts (unrelated to the facts), the KL divergence of
  the next-token distribution, whether the top-1 token changed, and whether the greedy
  completion stayed the same;
- counterfact (when the facts name the answer they replace, `target_true`): the
  CounterFact metrics before and after the edit (`cfmlang.eval.counterfact`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from cfmlang.eval import counterfact
from cfmlang.ops.update.editing import Log, encode, padded, target_ids

T = TypeVar("T")


@dataclass(frozen=True)
class Probe:
    """A prompt and the completion the edit wants there (None for neighbourhood prompts)."""

    prompt: str
    target: str | None


@dataclass(frozen=True)
class Snapshot:
    """One model's answers on the probes: greedy completions, target probabilities and
    next-token log-distributions."""

    completions: tuple[str, ...]
    target_probabilities: tuple[float | None, ...]
    next_token: torch.Tensor          # [probes, vocab] log-probabilities


BATCH = 16


def chunks(items: list, size: int = BATCH):
    return [items[i:i + size] for i in range(0, len(items), size)]


def greedy(model, tokenizer, prompts: list[str], tokens: int) -> list[str]:
    """Greedy completions of `tokens` tokens (left-padded batches)."""
    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch_prompts in chunks(prompts):
            batch = tokenizer(batch_prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def log_probabilities(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(**batch).logits.float(), -1)


def target_probabilities(model, tokenizer, probes: list[Probe]) -> list[float]:
    """P(target tokens | prompt) under teacher forcing, per probe."""
    out = []
    for group in chunks(probes):
        prompts = [tokenizer(p.prompt)["input_ids"] for p in group]
        targets = [target_ids(tokenizer, p.target) for p in group]
        log_probs = log_probabilities(model, padded(tokenizer, [p + t for p, t in zip(prompts, targets)]))
        for row, (prompt, target) in enumerate(zip(prompts, targets)):
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
            out.append(float(log_probs[row, positions, torch.tensor(target)].sum().exp()))
    return out


def next_tokens(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """[n, vocab] next-token log-probabilities after each prompt."""
    rows = []
    for group in chunks(prompts):
        batch = encode(tokenizer, group)
        lengths = batch["attention_mask"].sum(1)
        rows.append(log_probabilities(model, batch)[torch.arange(len(group)), lengths - 1])
    return torch.cat(rows) if rows else torch.zeros(0)


def snapshot(model, tokenizer, probes: list[Probe], tokens: int) -> Snapshot:
    completions = tuple(greedy(model, tokenizer, [p.prompt for p in probes], tokens))
    with_target = [p for p in probes if p.target is not None]
    found = iter(target_probabilities(model, tokenizer, with_target))
    probabilities = tuple(None if p.target is None else next(found) for p in probes)
    return Snapshot(completions, probabilities, next_tokens(model, tokenizer, [p.prompt for p in probes]))


def completes_with(completion: str, target: str) -> bool:
    return completion.strip().startswith(target.strip())


def fact_rows(probes: list[Probe], before: Snapshot, after: Snapshot, offset: int) -> list[dict]:
    return [{"prompt": p.prompt, "target": p.target,
             "probability_before": before.target_probabilities[offset + i],
             "probability_after": after.target_probabilities[offset + i],
             "completion_before": before.completions[offset + i],
             "completion_after": after.completions[offset + i],
             "success": completes_with(after.completions[offset + i], p.target)}
            for i, p in enumerate(probes)]


def neighbour_rows(probes: list[Probe], before: Snapshot, after: Snapshot, offset: int) -> list[dict]:
    rows = []
    for i, p in enumerate(probes):
        old, new = before.next_token[offset + i], after.next_token[offset + i]
        kl = float(torch.nn.functional.kl_div(new, old, log_target=True, reduction="sum"))
        rows.append({"prompt": p.prompt, "kl": max(kl, 0.0),
                     "top1_changed": int(old.argmax()) != int(new.argmax()),
                     "completion_before": before.completions[offset + i],
                     "completion_after": after.completions[offset + i],
                     "unchanged": before.completions[offset + i] == after.completions[offset + i]})
    return rows


def summary(facts: list[dict], paraphrases: list[dict], neighbourhood: list[dict]) -> dict:
    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "facts": len(facts),
        "efficacy": mean([r["success"] for r in facts]),
        "probability_before": mean([r["probability_before"] for r in facts]),
        "probability_after": mean([r["probability_after"] for r in facts]),
        "paraphrases": len(paraphrases),
        "generalisation": mean([r["success"] for r in paraphrases]),
        "neighbourhood": len(neighbourhood),
        "specificity": mean([r["unchanged"] for r in neighbourhood]),
        "top1_unchanged": mean([not r["top1_changed"] for r in neighbourhood]),
        "kl_mean": mean([r["kl"] for r in neighbourhood]),
    }


def measured(model, tokenizer, facts, neighbourhood: tuple[str, ...], tokens: int, edit: Callable[[], T],
             log: Log = lambda msg: None) -> tuple[T, dict]:
    """Run `edit()` (which changes `model` in place) between two snapshots of the model's
    answers; return its result and the report."""
    fact_probes = [Probe(f.prompt, f.target) for f in facts]
    paraphrase_probes = [Probe(p, f.target) for f in facts for p in f.paraphrases]
    neighbour_probes = [Probe(p, None) for p in neighbourhood]
    probes = fact_probes + paraphrase_probes + neighbour_probes
    counterfacts = [counterfact.Counterfact(f.prompt, f.subject, f.target_true, f.target, f.paraphrases,
                                            f.neighbourhood) for f in facts if f.target_true is not None]
    log(f"  measuring {len(probes)} prompts before the edit")
    before = snapshot(model, tokenizer, probes, tokens)
    counterfact_before = counterfact.measure(model, tokenizer, counterfacts) if counterfacts else None
    result = edit()
    log(f"  measuring {len(probes)} prompts after the edit")
    after = snapshot(model, tokenizer, probes, tokens)
    rows = {"facts": fact_rows(fact_probes, before, after, 0),
            "paraphrases": fact_rows(paraphrase_probes, before, after, len(fact_probes)),
            "neighbourhood": neighbour_rows(neighbour_probes, before, after,
                                            len(fact_probes) + len(paraphrase_probes))}
    report = {"summary": summary(**rows), "completion_tokens": tokens, **rows}
    if counterfacts:
        counterfact_after = counterfact.measure(model, tokenizer, counterfacts)
        report["counterfact"] = {"before": counterfact_before["summary"], "after": counterfact_after["summary"],
                                 "facts": counterfact_after["facts"]}
    return result, report


def render(report: dict) -> str:
    """A few human lines: the summary, then each fact."""
    s = report["summary"]
    lines = [f"efficacy: {sum(r['success'] for r in report['facts'])}/{s['facts']} facts completed with the "
             f"target; mean p(target) {s['probability_before']:.3f} -> {s['probability_after']:.3f}"]
    if s["paraphrases"]:
        lines.append(f"generalisation: {sum(r['success'] for r in report['paraphrases'])}/{s['paraphrases']} "
                     "paraphrases completed with the target")
    if s["neighbourhood"]:
        lines.append(f"specificity: {sum(r['unchanged'] for r in report['neighbourhood'])}/{s['neighbourhood']} "
                     f"neighbourhood completions unchanged, top-1 unchanged {s['top1_unchanged']:.0%}, "
                     f"mean KL {s['kl_mean']:.4f}")
    if "counterfact" in report:
        lines.append(render_counterfact(report["counterfact"]))
    for row in report["facts"]:
        mark = "ok  " if row["success"] else "MISS"
        lines.append(f"  {mark} {row['prompt']!r} -> {row['completion_after']!r} "
                     f"(p {row['probability_before']:.3f} -> {row['probability_after']:.3f})")
    return "\n".join(lines)


COUNTERFACT_COLUMNS = ("efficacy", "greedy_efficacy", "paraphrase", "neighbourhood", "score", "fluency")


def render_counterfact(measured: dict) -> str:
    """CounterFact metrics before -> after, one line."""
    def shown(name, value):
        return "-" if value is None else f"{value:.2f}" if name == "fluency" else f"{value:.1%}"

    parts = [f"{name} {shown(name, measured['before'][name])} -> {shown(name, measured['after'][name])}"
             for name in COUNTERFACT_COLUMNS]
    return f"counterfact ({measured['after']['facts']} facts): " + ", ".join(parts)
