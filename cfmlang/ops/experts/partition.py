"""Partitions of one FFN's neurons into `count` equal groups (experts).

- kmeans: balanced k-means on the neurons' normalized gate and up rows (MoEfication's
  parameter clustering, extended to gated FFNs by joining both rows).
- cooccurrence: a balanced partition of the co-activation graph measured on calibration
  text (edge weight = how strongly two neurons are active on the same tokens), found by
  spectral embedding of the graph and balanced k-means on the embedding.
- random: a seeded permutation cut into equal blocks.

Every function returns labels: a LongTensor [N] with each neuron's expert, every expert
holding exactly N / count neurons.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KMEANS_ROUNDS = 30


def balanced_assign(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Labels maximizing `scores` [N, E] greedily under the capacity `size` per group.

    Rounds: each unassigned neuron proposes to its best group that still has room, and
    each group accepts its highest-scoring proposals up to its remaining room."""
    neurons, groups = scores.shape
    labels = torch.full((neurons,), -1, dtype=torch.long)
    room = torch.full((groups,), size, dtype=torch.long)
    while (labels < 0).any():
        free = (labels < 0).nonzero().squeeze(1)
        open_groups = room > 0
        proposal = scores[free].masked_fill(~open_groups, float("-inf"))
        best, choice = proposal.max(dim=1)
        for group in choice.unique().tolist():
            wanting = (choice == group).nonzero().squeeze(1)
            taken = wanting[best[wanting].argsort(descending=True)[: int(room[group])]]
            labels[free[taken]] = group
            room[group] -= len(taken)
    return labels


def balanced_kmeans(points: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """k-means whose clusters all hold len(points) / count points (k-means++ start)."""
    points = points.float()
    size = points.shape[0] // count
    generator = torch.Generator().manual_seed(seed)
    centres = kmeans_plus_plus(points, count, generator)
    labels = torch.empty(0, dtype=torch.long)
    for _ in range(KMEANS_ROUNDS):
        scores = points @ centres.t() - 0.5 * (centres * centres).sum(-1)   # = -|p - c|^2 / 2 + const
        new = balanced_assign(scores, size)
        if torch.equal(new, labels):
            break
        labels = new
        centres = torch.zeros_like(centres).index_add_(0, labels, points) / size
    return labels


def kmeans_plus_plus(points: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(points.shape[0], (1,), generator=generator)
    centres = [points[first[0]]]
    nearest = ((points - centres[0]) ** 2).sum(-1)
    for _ in range(count - 1):
        weights = nearest.clamp_min(0) + 1e-12
        pick = torch.multinomial(weights, 1, generator=generator)[0]
        centres.append(points[pick])
        nearest = torch.minimum(nearest, ((points - points[pick]) ** 2).sum(-1))
    return torch.stack(centres)


def kmeans_split(gate: torch.Tensor, up: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    points = torch.cat([F.normalize(gate.float(), dim=1), F.normalize(up.float(), dim=1)], dim=1)
    return balanced_kmeans(points, count, seed)


def random_split(neurons: int, count: int, seed: int) -> torch.Tensor:
    order = torch.randperm(neurons, generator=torch.Generator().manual_seed(seed))
    labels = torch.empty(neurons, dtype=torch.long)
    labels[order] = torch.arange(neurons) // (neurons // count)
    return labels


def coactivation(activations: torch.Tensor) -> torch.Tensor:
    """The co-activation graph [N, N] of activations [T, N]: the sum over tokens of the
    product of two neurons' activation magnitudes, each token's magnitudes scaled to
    unit norm (so every token weighs the same); no self loops."""
    magnitude = F.normalize(activations.float().abs(), dim=1)
    graph = magnitude.t() @ magnitude
    graph.fill_diagonal_(0)
    return graph


def cooccurrence_split(activations: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Balanced graph partition of the co-activation graph: the neurons' coordinates on
    the leading eigenvectors of the normalized adjacency D^-1/2 W D^-1/2 (spectral
    clustering), row-normalized, cut into equal groups by balanced k-means."""
    graph = coactivation(activations).double()
    degree = graph.sum(1).clamp_min(1e-12).rsqrt()
    normalized = degree[:, None] * graph * degree[None, :]
    _, vectors = torch.linalg.eigh(normalized)
    embedding = F.normalize(vectors[:, -count:].float(), dim=1)
    return balanced_kmeans(embedding, count, seed)


def functional_split(scores: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Balanced k-means on each neuron's FuncScore profile ([neurons, abilities], each
    ability's scores standardised over the layer), so that neurons specialised in the
    same abilities share an expert."""
    scores = scores.double()
    spread = scores.std(dim=0, keepdim=True).clamp_min(1e-12)
    return balanced_kmeans((scores - scores.mean(dim=0, keepdim=True)) / spread, count, seed)


def order_of(labels: torch.Tensor) -> torch.Tensor:
    """The neuron permutation that puts expert 0's neurons first, then expert 1's ...
    (each expert's neurons in their original order)."""
    return torch.sort(labels, stable=True).indices
