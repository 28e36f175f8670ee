"""Functional specialisation: how well each neuron's activation separates one ability.

A[i, layer, n] is the mean |a_n| over the tokens of prompt i. FuncScore(n, f) is the
average precision of ranking the prompts by A[:, n] at retrieving the prompts of
ability f: AP = sum over positives p of precision@rank(p) / #positives, where prompts
with equal activation form one group and count at the group's last rank (the
step-function AP of scikit-learn). Chance level is the share of positives."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cfmlang.analysis.activations import instance_activations
from cfmlang.analysis.probes import Probes


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP of every column of `scores` [items, columns] at retrieving `labels` [items] (bool).

    Higher scores rank first; columns are independent. Float64 sums."""
    order = scores.argsort(dim=0, descending=True, stable=True)
    return _ap_in_order(scores.gather(0, order), labels.bool()[order])


def _ap_in_order(sorted_scores: torch.Tensor, sorted_labels: torch.Tensor) -> torch.Tensor:
    hits = sorted_labels.double().cumsum(0)
    group_end = _tie_group_ends(sorted_scores)
    precision = hits.gather(0, group_end) / (group_end + 1).double()
    positives = sorted_labels.double().sum(0)
    return (precision * sorted_labels).sum(0) / positives.clamp_min(1)


def _tie_group_ends(sorted_scores: torch.Tensor) -> torch.Tensor:
    """For every rank, the last rank holding the same score (scores sorted descending)."""
    items = sorted_scores.shape[0]
    ranks = torch.arange(items).view(-1, *([1] * (sorted_scores.dim() - 1))).expand_as(sorted_scores)
    is_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    candidates = torch.where(is_end, ranks, torch.full_like(ranks, items))
    return candidates.flip(0).cummin(0).values.flip(0)


def scores_from_activations(activations: torch.Tensor, labels: torch.Tensor, abilities: int) -> torch.Tensor:
    """FuncScore [layers, neurons, abilities] from A [prompts, layers, neurons] and prompt labels."""
    prompts, layers, neurons = activations.shape
    flat = activations.reshape(prompts, layers * neurons)
    order = flat.argsort(dim=0, descending=True, stable=True)
    sorted_scores = flat.gather(0, order)
    result = torch.empty(layers * neurons, abilities, dtype=torch.float64)
    for ability in range(abilities):
        result[:, ability] = _ap_in_order(sorted_scores, (labels == ability)[order])
    return result.reshape(layers, neurons, abilities).float()


def func_scores(model, probes: Probes, *, max_batch_tokens: int = 2048, tick=lambda: None) -> torch.Tensor:
    """FuncScore(n, f) of every FFN neuron of `model` for every ability of `probes`,
    as a tensor [layers, neurons, abilities] (abilities in `probes.abilities` order)."""
    activations = instance_activations(model, probes, max_batch_tokens=max_batch_tokens, tick=tick)
    return scores_from_activations(activations, torch.tensor(probes.labels), len(probes.abilities))


def shuffled(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The labels in a seeded random order: the no-specialisation baseline."""
    generator = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(len(labels), generator=generator)]


def top_permille_rank(neurons: int, permille: float = 5.0) -> int:
    """0-based rank of the '5 per mille best' neuron of a layer of `neurons`."""
    return max(1, math.ceil(neurons * permille / 1000)) - 1


@dataclass(frozen=True)
class LayerSummary:
    """Per layer and ability: the best score, the 5-per-mille-best score, the mean score."""

    best: torch.Tensor          # [layers, abilities]
    top_permille: torch.Tensor  # [layers, abilities]
    mean: torch.Tensor          # [layers, abilities]


def summarize_layers(scores: torch.Tensor, permille: float = 5.0) -> LayerSummary:
    ranked = scores.sort(dim=1, descending=True).values
    return LayerSummary(ranked[:, 0], ranked[:, top_permille_rank(scores.shape[1], permille)],
                        scores.mean(dim=1))


def top_neurons(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean [abilities, layers, neurons]: each layer's `fraction` of neurons with the
    highest FuncScore for each ability (at least one per layer)."""
    layers, neurons, abilities = scores.shape
    count = max(1, round(fraction * neurons))
    chosen = torch.zeros(abilities, layers, neurons, dtype=torch.bool)
    best = scores.permute(2, 0, 1).topk(count, dim=-1).indices
    return chosen.scatter(-1, best, True)
