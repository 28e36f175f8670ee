"""Perturbation and partitions: zero an ability's neurons, measure every ability.

Perplexity of ability g = exp(total NLL of g's prompts / their predicted tokens).
Relative increase when the neurons of set S are zeroed: ppl_S(g) / ppl(g) - 1."""
from __future__ import annotations

import torch

from cfmlang.analysis.activations import probe_nll


def zero_neurons(chosen: torch.Tensor):
    """An FFN edit zeroing, in every layer, the neurons marked in `chosen` [layers, neurons]."""
    keep = ~chosen

    def edit(layer: int, a: torch.Tensor) -> torch.Tensor:
        return a * keep[layer].to(a.dtype)
    return edit


def ability_perplexity(nll: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor, abilities: int) -> torch.Tensor:
    """[abilities] perplexity from per-prompt summed NLL and token counts."""
    total = torch.zeros(abilities, dtype=torch.float64).index_add_(0, labels, nll)
    tokens = torch.zeros(abilities, dtype=torch.float64).index_add_(0, labels, counts)
    return (total / tokens).exp()


def perplexity_with(model, probes, chosen: torch.Tensor | None, **options) -> torch.Tensor:
    """Per-ability perplexity of `probes` with the neurons in `chosen` zeroed (None: intact)."""
    edit = None if chosen is None else zero_neurons(chosen)
    nll, counts = probe_nll(model, probes, edit, **options)
    return ability_perplexity(nll, counts, torch.tensor(probes.labels), len(probes.abilities))


def random_neurons(layers: int, neurons: int, count: int, seed: int) -> torch.Tensor:
    """`count` neurons per layer drawn uniformly (seeded): the control set."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(neurons, generator=generator)[:count] for _ in range(layers)])
    return torch.zeros(layers, neurons, dtype=torch.bool).scatter(1, picks, True)


def overlap(sets: torch.Tensor) -> torch.Tensor:
    """[abilities, abilities]: |S_f ∩ S_g| / |S_f| over all layers, for boolean sets
    [abilities, layers, neurons]."""
    flat = sets.flatten(1).double()
    return (flat @ flat.T) / flat.sum(1, keepdim=True).clamp_min(1)


def jaccard(sets: torch.Tensor) -> torch.Tensor:
    flat = sets.flatten(1).double()
    shared = flat @ flat.T
    sizes = flat.sum(1)
    return shared / (sizes[:, None] + sizes[None, :] - shared).clamp_min(1)


def layer_overlap(sets: torch.Tensor) -> torch.Tensor:
    """[layers, abilities, abilities]: the overlap of the sets within each layer."""
    per_layer = sets.permute(1, 0, 2).double()
    shared = per_layer @ per_layer.transpose(1, 2)
    return shared / per_layer.sum(2, keepdim=True).clamp_min(1)
