"""CounterFact metrics of knowledge edits (Meng et al., ROME, section 3 and appendix), on
a causal LM in memory, for records of the form

    {"prompt": "Lyon is a city in the country of", "subject": "Lyon",
     "target_true": " France", "target_new": " Spain",
     "paraphrases": [...], "neighbourhood": [...]}

where `neighbourhood` prompts are about other subjects whose true answer is also
`target_true` (an edit must not move them). Per record:

- efficacy: P(target_new) > P(target_true) after the prompt;
- greedy efficacy: the greedy continuation of the prompt starts with target_new;
- paraphrase: the fraction of paraphrases with P(target_new) > P(target_true);
- neighbourhood: the fraction of neighbourhood prompts with P(target_true) > P(target_new);
- fluency: the weighted bi- and tri-gram entropy of text sampled after the prompt and
  its paraphrases (ROME's `n_gram_entropy`: per text, the mean of 2/3 H2 and 4/3 H3 in
  bits over word n-gram frequencies, the text including its prompt; averaged over texts).

P(target) is compared as the papers do: the mean log-probability per target token under
teacher forcing. Summaries average per record first, then over records; "score" is the
harmonic mean of efficacy, paraphrase and neighbourhood.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

BATCH = 32
FLUENCY_TOKENS = 64
"""New tokens sampled per fluency prompt (ROME samples up to 100 tokens including the prompt)."""
TOP_K = 5
"""Fluency text is sampled from the 5 most likely tokens at each step (ROME's generate_fast)."""


@dataclass(frozen=True)
class Counterfact:
    prompt: str
    subject: str
    target_true: str
    target_new: str
    paraphrases: tuple[str, ...]
    neighbourhood: tuple[str, ...]

    @classmethod
    def of(cls, record: dict) -> "Counterfact":
        return cls(record["prompt"], record["subject"], record["target_true"], record["target_new"],
                   tuple(record.get("paraphrases", ())), tuple(record.get("neighbourhood", ())))


def chunks(items: list, size: int = BATCH) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def target_logprobs(model, tokenizer, pairs: list[tuple[str, str]]) -> list[float]:
    """Mean log-probability per token of each target after its prompt (teacher forcing;
    prompt and target tokenized apart, the target keeping its leading space)."""
    out = []
    for group in chunks(pairs):
        prompts = [tokenizer(p)["input_ids"] for p, _ in group]
        targets = [tokenizer(t, add_special_tokens=False)["input_ids"] for _, t in group]
        ids, mask = right_padded(tokenizer, [p + t for p, t in zip(prompts, targets)])
        rows_at = torch.tensor([row for row, t in enumerate(targets) for _ in t])
        positions = torch.tensor([len(p) - 1 + i for p, t in zip(prompts, targets) for i in range(len(t))])
        with torch.no_grad():
            log_probs = torch.log_softmax(logits_at(model, ids, mask, rows_at, positions), -1)
        picked = log_probs[torch.arange(len(positions)), torch.tensor([i for t in targets for i in t])]
        start = 0
        for target in targets:
            out.append(float(picked[start:start + len(target)].mean()))
            start += len(target)
    return out


def right_padded(tokenizer, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of right-padded rows (positions do not move)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def encode_right(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return right_padded(tokenizer, [tokenizer(t)["input_ids"] for t in texts])


def logits_at(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor):
    """Float logits at (rows, positions) only: the output layer (a small model's largest
    matrix) runs on the target positions, not on every token, where the model exposes
    its decoder and output embeddings (transformers' causal LMs do)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or decoder is None:
        return model(input_ids=ids, attention_mask=mask).logits[rows, positions].float()
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return head(hidden[rows, positions]).float()


def generated(model, tokenizer, prompts: list[str], tokens: int, top_k: int | None = None,
              seed: int = 0) -> list[str]:
    """Continuations of `tokens` new tokens: greedy (top_k None) or sampled from the top_k
    tokens under `seed` (left-padded batches)."""
    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    sampling = {"do_sample": True, "top_k": top_k, "top_p": 1.0, "temperature": 1.0} if top_k else \
        {"do_sample": False, "top_k": None, "top_p": None, "temperature": None}
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for group in chunks(prompts):
                batch = tokenizer(group, return_tensors="pt", padding=True)
                with torch.no_grad():
                    ids = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens,
                                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                         **sampling)
                out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def words(text: str) -> list[str]:
    """Word tokens: runs of word characters, and each other non-space character alone
    (close to nltk's word_tokenize on generated prose, without its sentence model)."""
    return re.findall(r"\w+|[^\w\s]", text)


def ngram_entropy(text: str, orders: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: the mean over n of weight_n * H_n, H_n the entropy in
    bits of the text's word n-gram frequencies (0 for an order with no n-gram)."""
    tokens = words(text)
    values = []
    for n, weight in zip(orders, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


def fact_rows(model, tokenizer, facts: list[Counterfact], fluency_tokens: int = FLUENCY_TOKENS,
              seed: int = 0) -> list[dict]:
    """One dict per fact: its metrics (see the module) and what they were computed from."""
    pairs, spans = [], []
    for f in facts:
        start = len(pairs)
        for prompt in (f.prompt, *f.paraphrases, *f.neighbourhood):
            pairs += [(prompt, f.target_new), (prompt, f.target_true)]
        spans.append(start)
    scores = target_logprobs(model, tokenizer, pairs)
    greedy_tokens = max(len(tokenizer(f.target_new, add_special_tokens=False)["input_ids"]) for f in facts)
    completions = generated(model, tokenizer, [f.prompt for f in facts], greedy_tokens)
    fluency_prompts = [p for f in facts for p in (f.prompt, *f.paraphrases)]
    texts = iter(generated(model, tokenizer, fluency_prompts, fluency_tokens, TOP_K, seed)) \
        if fluency_tokens else None
    rows = []
    for f, start, completion in zip(facts, spans, completions):
        new_old = [(scores[i], scores[i + 1]) for i in range(start, start + 2 * (1 + len(f.paraphrases) +
                                                                               len(f.neighbourhood)), 2)]
        rewrite, paraphrase = new_old[0], new_old[1:1 + len(f.paraphrases)]
        neighbourhood = new_old[1 + len(f.paraphrases):]
        row = {"prompt": f.prompt, "target_new": f.target_new, "target_true": f.target_true,
               "logprob_new": rewrite[0], "logprob_true": rewrite[1],
               "efficacy": rewrite[0] > rewrite[1],
               "completion": completion, "greedy_efficacy": completes_with(completion, f.target_new),
               "paraphrase": mean([new > old for new, old in paraphrase]),
               "neighbourhood": mean([old > new for new, old in neighbourhood])}
        if texts is not None:
            row["fluency"] = mean([ngram_entropy(prompt + next(texts)) for prompt in (f.prompt, *f.paraphrases)])
        rows.append(row)
    return rows


def completes_with(completion: str, target: str) -> bool:
    return completion.strip().startswith(target.strip())


def mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def harmonic(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return 0.0 if min(present) <= 0 else len(present) / sum(1 / v for v in present)


def summary(rows: list[dict]) -> dict:
    """The CounterFact numbers of a set of facts (fractions in [0, 1]; fluency in bits)."""
    out = {name: mean([r[name] for r in rows if r[name] is not None])
           for name in ("efficacy", "greedy_efficacy", "paraphrase", "neighbourhood")}
    out["score"] = harmonic([out["efficacy"], out["paraphrase"], out["neighbourhood"]])
    out["fluency"] = mean([r["fluency"] for r in rows]) if rows and "fluency" in rows[0] else None
    return {"facts": len(rows), **out}


def measure(model, tokenizer, facts: list[Counterfact], fluency_tokens: int = FLUENCY_TOKENS,
            seed: int = 0) -> dict:
    """{"summary": ..., "facts": rows} of `facts` on `model`."""
    rows = fact_rows(model, tokenizer, facts, fluency_tokens, seed)
    return {"summary": summary(rows), "facts": rows}
