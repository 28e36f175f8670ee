"""The CounterFact metrics (`cfmlang.eval.counterfact`, `cfmc eval` kind `counterfact`) on
a tiny random model: every probability comparison is recomputed here, one unpadded
forward pass per (prompt, target), and the fluency entropy is worked out by hand."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfmlang.diagnostics import CompileError
from cfmlang.eval import Settings, evaluate, load_task
from cfmlang.eval.counterfact import Counterfact, fact_rows, harmonic, ngram_entropy, summary
from cfmlang.eval.tasks import PACK
from models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    {"prompt": "the sky of the sea", "subject": "sea", "target_true": " poem", "target_new": " math",
     "paraphrases": ["a verse of the sea", "the sea is"], "neighbourhood": ["the story of the night", "a loop",
                                                                          "print the number"]},
    {"prompt": "the code in the loop", "subject": "loop", "target_true": " love", "target_new": " sum of",
     "paraphrases": ["a loop is", "the loop"], "neighbourhood": ["the sky is", "add the", "a rhyme"]},
    {"prompt": "print the number", "subject": "number", "target_true": " verse", "target_new": " sky",
     "paraphrases": ["the number is", "a number to add"], "neighbourhood": ["the sea", "love is", "the night"]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("counterfact") / "model"
    tiny_model(folder, seed=5)
    tiny_tokenizer(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def mean_logprob(model, tokenizer, prompt: str, target: str) -> float:
    """Reference: one sequence, no padding, the target's tokens' mean log-probability."""
    head = tokenizer(prompt)["input_ids"]
    tail = tokenizer(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([head + tail])).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)
    return sum(float(log_probs[len(head) - 1 + i, t]) for i, t in enumerate(tail)) / len(tail)


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab x2, ba x1 -> H2 = h(1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2, abs=1e-12)
    assert ngram_entropy("x x x x x") == 0.0                   # one repeated word: no information
    assert ngram_entropy("Hi, you.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)   # Hi , you .
    assert ngram_entropy("one") == 0.0


def test_harmonic_mean():
    assert harmonic([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic([1.0, 0.0, 1.0]) == 0.0
    assert harmonic([None, 0.5]) == 0.5


def test_fact_rows_match_unpadded_reference(tiny):
    model, tokenizer = tiny
    facts = [Counterfact.of(r) for r in RECORDS]
    rows = fact_rows(model, tokenizer, facts, fluency_tokens=6)
    for record, row in zip(RECORDS, rows):
        def prefers_new(prompt):
            return mean_logprob(model, tokenizer, prompt, record["target_new"]) > \
                mean_logprob(model, tokenizer, prompt, record["target_true"])
        assert row["logprob_new"] == pytest.approx(mean_logprob(model, tokenizer, record["prompt"],
                                                                record["target_new"]), abs=1e-5)
        assert row["efficacy"] == prefers_new(record["prompt"])
        assert row["paraphrase"] == pytest.approx(sum(map(prefers_new, record["paraphrases"])) / 2)
        assert row["neighbourhood"] == pytest.approx(
            sum(not prefers_new(p) for p in record["neighbourhood"]) / 3)
        ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        width = len(tokenizer(" sum of", add_special_tokens=False)["input_ids"])
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=width,
                                do_sample=False, pad_token_id=0)
        completion = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
        assert row["completion"] == completion
        assert row["greedy_efficacy"] == completion.strip().startswith(record["target_new"].strip())
        assert row["fluency"] > 0
    total = summary(rows)
    efficacy = sum(r["efficacy"] for r in rows) / 3
    paraphrase = sum(r["paraphrase"] for r in rows) / 3
    neighbourhood = sum(r["neighbourhood"] for r in rows) / 3
    assert total["efficacy"] == pytest.approx(efficacy) and total["paraphrase"] == pytest.approx(paraphrase)
    assert total["score"] == pytest.approx(harmonic([efficacy, paraphrase, neighbourhood]))
    assert total["fluency"] == pytest.approx(sum(r["fluency"] for r in rows) / 3)
    # seeded: the same numbers twice
    assert fact_rows(model, tokenizer, facts, fluency_tokens=6) == rows


def test_counterfact_task_kind(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "cf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    task = load_task(path)
    assert task.kind == "counterfact"
    result = evaluate(model, tokenizer, [task], Settings(limit=2))
    metrics = result.tasks[0].metrics
    rows = fact_rows(model, tokenizer, [Counterfact.of(r) for r in RECORDS[:2]])
    assert metrics == {k: v for k, v in summary(rows).items() if k != "facts"}
    assert set(metrics) == {"efficacy", "greedy_efficacy", "paraphrase", "neighbourhood", "score", "fluency"}
    assert [d["line"] for d in result.tasks[0].details] == [1, 2]


@pytest.mark.parametrize("change, words", [
    ({"target_new": " poem"}, "must differ"),
    ({"subject": "moon"}, "does not occur"),
    ({"neighbourhood": "the sea"}, "`neighbourhood` must be a list"),
    ({"target_true": ""}, "`target_true` must be a non-empty string")])
def test_malformed_counterfact_records_name_their_line(tmp_path, change, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({**RECORDS[0], **change}) + "\n")
    with pytest.raises(CompileError) as caught:
        load_task(path)
    problem = caught.value.diagnostics[0]
    assert problem.code == "E231" and words in problem.message and problem.span.line == 2
def test_shipped_sets_are_disjoint_counterfacts():
    """The held-out and tuning sets ship with the package, share no edited subject, and no
    fact's neighbourhood prompt is about a subject edited in its own set."""
    sets = {name: load_task(name) for name in ("counterfact_heldout", "counterfact_tuning")}
    assert all(t.kind == "counterfact" and len(t.items) >= 100 for t in sets.values())
    subjects = {name: {r["subject"] for r in t.items} for name, t in sets.items()}
    assert not subjects["counterfact_heldout"] & subjects["counterfact_tuning"]
    for name, task in sets.items():
        for record in task.items:
            assert len(record["paraphrases"]) >= 2 and len(record["neighbourhood"]) >= 3
            assert not any(s in p for p in record["neighbourhood"] for s in subjects[name]
                           if len(s) > 3 and s != record["subject"] and f" {s} " in f" {p} ")
    assert (PACK / "counterfact_heldout.jsonl").is_file()
