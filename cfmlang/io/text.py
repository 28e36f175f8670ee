"""Text to run a model on, as token ids: windows of a tokenized text, the text shipped
with cfmlang (calibration corpus and probe sets), and text the model samples itself."""
from __future__ import annotations

from importlib import resources

import torch

WINDOW = 256
"""Tokens per window of calibration text."""


def windows(ids: list[int]) -> torch.Tensor:
    """[windows, length]: `ids` cut into windows of WINDOW tokens (one shorter window when
    there are fewer), the remainder dropped."""
    length = min(WINDOW, len(ids))
    return torch.tensor(ids[:len(ids) // length * length]).view(-1, length)


SHIPPED_TEXT = (("cfmlang.ops.experts", "data/calibration.txt"),) + tuple(
    ("cfmlang.analysis", f"probes/{name}.txt")
    for name in ("coding", "ethics", "knowledge", "linguistic", "math", "translation", "writing"))
"""Text written for the project and shipped with it: the MoE calibration corpus and the
ability probe sets (prose, code, arithmetic, dialogue, facts, several languages)."""


def shipped_windows(tokenizer) -> torch.Tensor:
    """[windows, <= 256] token ids of the shipped text (about 11k SmolLM2 tokens)."""
    text = "\n\n".join(resources.files(package).joinpath(name).read_text(encoding="utf-8")
                        for package, name in SHIPPED_TEXT)
    return windows(tokenizer(text, add_special_tokens=False)["input_ids"])


CALIBRATION_OPENERS = ("The", "In", "A", "It", "When", "Many", "This", "One")


def sampled_tokens(model, tokenizer, count: int, tokens: int, seed: int) -> torch.Tensor:
    """[count, 1 + tokens] token ids sampled from the model itself after a few opening
    words (seeded, so the same in every run): hermetic calibration text for key
    statistics."""
    openers = [tokenizer(w, add_special_tokens=False)["input_ids"][-1] for w in CALIBRATION_OPENERS]
    start = torch.tensor([[openers[i % len(openers)]] for i in range(count)])
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        return model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                              top_p=1.0, temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
