"""The numbers of the built-in task kinds, computed directly on a causal LM.

Perplexity: exp(mean NLL over every predicted token, i.e. all tokens but the first).
Token t is predicted once, in a window of at most `context` tokens ending after it;
windows advance by `stride` tokens, so each token sees at least `context - stride`
tokens before it (all of them while the text fits in one window).

Log-likelihood of a continuation given a context, as lm-evaluation-harness computes it:
context and context+continuation are encoded without special tokens, the continuation's
tokens are those of the whole past the context's, and their log-probabilities are summed.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scored:
    """What a task kind measured: its metrics and one JSON-ready dict per item."""
    metrics: dict       # metric name -> value
    details: tuple
    items: int


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float          # mean NLL per predicted token (nats)
    tokens: int         # tokens predicted


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def perplexity(model, ids: list[int], context: int, stride: int, tick=lambda: None) -> Perplexity:
    """Perplexity of the token sequence `ids` with windows of `context` tokens."""
    total, counted, first = 0.0, 0, 1
    while first < len(ids):
        end = min(first + stride, len(ids))
        start = max(0, end - context)
        window = torch.tensor([ids[start:end]])
        with torch.inference_mode():
            logits = model(input_ids=window).logits[0].float()
        predicted = torch.arange(first, end) - start       # positions of the targets in the window
        log_probs = torch.log_softmax(logits[predicted - 1], dim=-1)
        total -= log_probs.gather(1, window[0, predicted].unsqueeze(1)).sum().item()
        counted += end - first
        first = end
        tick()
    return Perplexity(math.exp(total / counted), total / counted, counted)


def pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens; trailing spaces of the context move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode_text(tokenizer, context + continuation), encode_text(tokenizer, context)
    return head, whole[len(head):]


def response_tokens(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """Prompt and response tokens as a chat turn: the prompt in the tokenizer's chat
    template (with `system` as the system message when given) when it has one, else the
    prompt and a newline; the response followed by the end-of-sequence token."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        head_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        head_text = prompt + "\n"
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return encode_text(tokenizer, head_text), encode_text(tokenizer, response) + eos


def loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                   tick=lambda: None) -> list[float]:
    """Summed log-probability of each continuation after its context, `batch_size` pairs a pass."""
    scores = []
    for begin in range(0, len(pairs), batch_size):
        batch = pairs[begin:begin + batch_size]
        rows = [head + tail for head, tail in batch]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        with torch.inference_mode():
            log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (head, tail) in enumerate(batch):
            positions = torch.arange(len(head) - 1, len(head) + len(tail) - 1)
            scores.append(log_probs[i, positions, torch.tensor(tail)].sum().item())
        tick()
    return scores


def greedy_answer(model, tokenizer, prompt: str, max_tokens: int, stop: list[str]) -> str:
    """The greedy continuation of `prompt`, cut before the first stop string."""
    ids = torch.tensor([encode_text(tokenizer, prompt)])
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]


def normalised(text: str) -> str:
    """Lower case, no punctuation, single spaces: how answers are compared."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()
