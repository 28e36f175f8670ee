"""Router initialisation for a mixture of experts built from dense fine-tunes
(mergekit-moe semantics): one gate vector per (layer, expert) from the expert's positive
prompts minus its negative prompts, under one of the gate modes:

- `hidden`: the base model's hidden state at the last prompt token, entering each layer
- `hidden_avg`: the same, averaged over the prompt's tokens
- `cheap_embed`: the sum of the prompts' token embeddings, the same vector for every layer
- `random`: standard normal draws; `uniform_random`: uniform in +-1/sqrt(hidden), the
  initialisation of torch.nn.Linear (both from the node's seeded generator)

Each expert's vectors are normalised per layer. Prompts are tokenised as mergekit does:
the BOS token prepended by hand, no other special tokens, padded to one batch.
"""
from __future__ import annotations

import math

import torch

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPTED_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


def tokenized(prompts: list[str], tokenizer) -> dict[str, torch.Tensor]:
    bos = tokenizer.bos_token or ""
    return dict(tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False))


def hidden_states(model, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """[layers, hidden]: the state entering each decoder layer, at the last position (or
    averaged over positions), averaged over the prompts."""
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])            # [layers, batch, tokens, hidden]
    # as mergekit: padded positions count in the average, and the "last" token of a
    # shorter prompt is whatever the tokenizer's padding side puts there
    per_prompt = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return per_prompt.sum(dim=1) / per_prompt.shape[1]


def cheap_embedding(embed: torch.Tensor, batch: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """[layers, hidden]: the unit-norm sum of every (unpadded) prompt token's embedding."""
    summed = (embed.float()[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0)
    return (summed / summed.norm().clamp(min=1e-8)).unsqueeze(0).repeat(num_layers, 1)


def random_gates(mode: str, num_layers: int, experts: int, hidden: int,
                 generator: torch.Generator) -> torch.Tensor:
    shape = (num_layers, experts, hidden)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    bound = math.sqrt(1.0 / hidden)
    return torch.rand(shape, generator=generator) * 2 * bound - bound


def prompted_gates(mode: str, model, tokenizer, prompts: list[tuple[list[str], list[str]]]) -> torch.Tensor:
    """[layers, experts, hidden] from each expert's (positive, negative) prompts."""
    num_layers = model.config.num_hidden_layers
    if mode == "cheap_embed":
        embed = model.get_input_embeddings().weight.detach()
        encode = lambda texts: cheap_embedding(embed, tokenized(texts, tokenizer), num_layers)  # noqa: E731
    else:
        encode = lambda texts: hidden_states(model, tokenized(texts, tokenizer), mode == "hidden_avg")  # noqa: E731
    vectors = []
    for positive, negative in prompts:
        vector = encode(positive)
        if negative:
            vector = vector - encode(negative)
        vectors.append(vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vectors, dim=1)
