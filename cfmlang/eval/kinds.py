"""One small class per task kind: how many progress steps it takes and how it scores.
`KINDS` maps a task's kind to its scorer; the lm-eval kind lives in harness.py."""
from __future__ import annotations

import math
from typing import Protocol

from cfmlang.diagnostics import CompileError, error
from cfmlang.eval import counterfact, scoring
from cfmlang.eval.harness import HarnessKind
from cfmlang.eval.scoring import Scored
from cfmlang.eval.tasks import Task


class Kind(Protocol):
    metrics: tuple[str, ...]
    """The metrics it reports, the headline first (empty: known only once it ran)."""

    def steps(self, task: Task, tokenizer, settings) -> int:
        """Progress steps the task takes (for a progress bar)."""

    def score(self, task: Task, model, tokenizer, settings, tick) -> Scored:
        """Metrics and per-item details of the task on the model."""


def limited(task: Task, settings) -> tuple:
    return task.items if settings.limit is None else task.items[:settings.limit]


class PerplexityKind:
    metrics = ("perplexity", "nll", "tokens")

    def steps(self, task, tokenizer, settings):
        ids = len(self.tokens(task, tokenizer, settings))
        return -(-(ids - 1) // settings.stride) if ids > 1 else 0

    @staticmethod
    def tokens(task, tokenizer, settings) -> list[int]:
        ids = scoring.encode_text(tokenizer, task.items[0])
        return ids if settings.limit is None else ids[:settings.limit]

    def score(self, task, model, tokenizer, settings, tick):
        ids = self.tokens(task, tokenizer, settings)
        if len(ids) < 2:
            raise CompileError([error("E234", f"task `{task.name}` has {len(ids)} token(s); perplexity needs "
                                      "at least two", None, f"put more text in {task.path}")])
        result = scoring.perplexity(model, ids, settings.context, settings.stride, tick)
        return Scored({"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens},
                      (), result.tokens)


class MultipleChoiceKind:
    """acc: the choice of highest summed log-likelihood is right; acc_norm: the same with
    each log-likelihood divided by its choice's length in characters (lm-eval's)."""

    metrics = ("acc", "acc_norm")

    def steps(self, task, tokenizer, settings):
        pairs = sum(len(r["choices"]) for r in limited(task, settings))
        return -(-pairs // settings.batch_size)

    def score(self, task, model, tokenizer, settings, tick):
        records = limited(task, settings)
        pairs = [scoring.pair_tokens(tokenizer, r["question"], " " + choice)
                 for r in records for choice in r["choices"]]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scores = iter(scoring.loglikelihoods(model, pairs, settings.batch_size, pad, tick))
        details = []
        for record in records:
            lls = [next(scores) for _ in record["choices"]]
            normed = [ll / len(choice) for ll, choice in zip(lls, record["choices"])]
            details.append({"line": record["_line"], "loglikelihoods": lls, "answer": record["answer"],
                            "acc": float(argmax(lls) == record["answer"]),
                            "acc_norm": float(argmax(normed) == record["answer"])})
        return Scored({"acc": mean(d["acc"] for d in details), "acc_norm": mean(d["acc_norm"] for d in details)},
                      tuple(details), len(details))


class GenerationKind:
    """Greedy decoding up to `max_tokens` (default `settings.max_new_tokens`), cut at the
    first stop string (default a newline); exact match after `scoring.normalised`."""

    metrics = ("exact_match",)

    def steps(self, task, tokenizer, settings):
        return len(limited(task, settings))

    def score(self, task, model, tokenizer, settings, tick):
        details = []
        for record in limited(task, settings):
            answer = scoring.greedy_answer(model, tokenizer, record["prompt"],
                                           record.get("max_tokens", settings.max_new_tokens),
                                           record.get("stop", ["\n"]))
            accepted = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
            match = scoring.normalised(answer) in {scoring.normalised(a) for a in accepted}
            details.append({"line": record["_line"], "output": answer, "exact_match": float(match)})
            tick()
        return Scored({"exact_match": mean(d["exact_match"] for d in details)}, tuple(details), len(details))


class CounterfactKind:
    """The CounterFact metrics of knowledge edits (see `cfmlang.eval.counterfact`): run on
    an edited model, efficacy, greedy efficacy, paraphrase, neighbourhood, their score and
    fluency; on the unedited model the same numbers give the baseline."""

    GROUP = 16

    def steps(self, task, tokenizer, settings):
        return -(-len(limited(task, settings)) // self.GROUP)

    def score(self, task, model, tokenizer, settings, tick):
        facts = [counterfact.Counterfact.of(r) for r in limited(task, settings)]
        rows = []
        for start in range(0, len(facts), self.GROUP):
            rows += counterfact.fact_rows(model, tokenizer, facts[start:start + self.GROUP], seed=start)
            tick()
        records = limited(task, settings)
        details = tuple({"line": record["_line"], **row} for record, row in zip(records, rows))
        metrics = {k: v for k, v in counterfact.summary(rows).items() if k != "facts"}
        return Scored(metrics, details, len(rows))


class ResponseKind:
    """Perplexity of each record's `response` after its `prompt` (the prompt in the
    tokenizer's chat template when it has one, with the record's `system` message if
    given, the response followed by the end-of-sequence token): what a LoRA brick trained
    on the same records learns. exp(mean NLL over every response token of every record)."""

    metrics = ("perplexity", "nll", "tokens")

    def steps(self, task, tokenizer, settings):
        return -(-len(limited(task, settings)) // settings.batch_size)

    def score(self, task, model, tokenizer, settings, tick):
        records = limited(task, settings)
        pairs = [scoring.response_tokens(tokenizer, r["prompt"], r["response"], r.get("system")) for r in records]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lls = scoring.loglikelihoods(model, pairs, settings.batch_size, pad, tick)
        tokens = sum(len(tail) for _, tail in pairs)
        nll = -sum(lls) / tokens
        details = tuple({"line": r["_line"], "loglikelihood": ll, "tokens": len(tail)}
                        for r, ll, (_, tail) in zip(records, lls, pairs))
        return Scored({"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}, details, len(records))


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


KINDS: dict[str, Kind] = {"perplexity": PerplexityKind(), "multiple_choice": MultipleChoiceKind(),
                          "generation": GenerationKind(), "counterfact": CounterfactKind(),
                          "response": ResponseKind(), "lm_eval": HarnessKind()}
