"""Sparse activation: LM loss when the least important neurons of every token are masked."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cfmlang.analysis.activations import down_weights, probe_nll
from cfmlang.analysis.indicators import CettThreshold, cett_threshold, column_norms, mask_below, mask_lowest
from cfmlang.analysis.probes import Probes


def mean_loss(model, probes: Probes, edit=None, **options) -> float:
    """Token-weighted mean next-token NLL over `probes` with FFNs edited by `edit`."""
    nll, counts = probe_nll(model, probes, edit, **options)
    return float(nll.sum() / counts.sum())


def layer_norms(model) -> list[torch.Tensor]:
    return [column_norms(w) for w in down_weights(model)]


def loss_curve(model, probes: Probes, kind: str, fractions, **options) -> list[float]:
    """LM loss with the `fraction` lowest-`kind` neurons masked per token, for each fraction."""
    norms = layer_norms(model)
    return [mean_loss(model, probes, mask_lowest(kind, f, norms), **options) for f in fractions]


def sample_tokens(per_layer: list[torch.Tensor], limit: int, seed: int) -> list[torch.Tensor]:
    """The same `limit` tokens (seeded draw) of every layer's [tokens, neurons] activations."""
    tokens = per_layer[0].shape[0]
    if tokens <= limit:
        return per_layer
    chosen = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [a[chosen] for a in per_layer]


@dataclass(frozen=True)
class CettResult:
    target: float
    layers: tuple[CettThreshold, ...]
    loss: float

    @property
    def mean_sparsity(self) -> float:
        return sum(layer.sparsity for layer in self.layers) / len(self.layers)


def calibrate_cett(token_acts: list[torch.Tensor], weights: list[torch.Tensor], target: float,
                   iterations: int, tick=lambda: None) -> tuple[CettThreshold, ...]:
    """Per layer, the threshold whose mean CETT over the calibration tokens equals `target`."""
    found = []
    for a, weight in zip(token_acts, weights):
        found.append(cett_threshold(a, weight, target, iterations))
        tick()
    return tuple(found)


def cett_loss(model, probes: Probes, thresholds: tuple[CettThreshold, ...], **options) -> float:
    """LM loss with every layer's neurons below its CETT threshold masked per token."""
    edit = mask_below([t.threshold for t in thresholds], layer_norms(model))
    return mean_loss(model, probes, edit, **options)
