"""Neuron importance indicators per token, and the FFN edits that mask by them.

Two indicators of neuron i for one token (the paper's §4 sparse-activation study):
activation magnitude |a_i|, and output magnitude ||a_i * W_down[:, i]|| = |a_i| * ||W_down[:, i]||.
CETT (cumulative error of tail truncation): with threshold eps, the neurons whose output
magnitude is below eps are dropped, and CETT = ||sum of the dropped outputs|| / ||FFN output||.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INDICATORS = ("activation", "output")


def column_norms(down_weight: torch.Tensor) -> torch.Tensor:
    """||W_down[:, i]|| for every neuron i of one layer."""
    return down_weight.float().norm(dim=0)


def indicator(kind: str, a: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    magnitude = a.abs()
    return magnitude if kind == "activation" else magnitude * norms.to(a.dtype)


def masked_count(fraction: float, width: int) -> int:
    """How many of `width` neurons a masking fraction removes (rounded down)."""
    return int(fraction * width + 1e-9)


def mask_lowest(kind: str, fraction: float, norms: list[torch.Tensor]):
    """An FFN edit zeroing, per token, the `fraction` of neurons with the lowest indicator."""
    def edit(layer: int, a: torch.Tensor) -> torch.Tensor:
        count = masked_count(fraction, a.shape[-1])
        if count == 0:
            return a
        lowest = indicator(kind, a, norms[layer]).topk(count, dim=-1, largest=False, sorted=False).indices
        return a.scatter(-1, lowest, 0.0)
    return edit


def mask_below(thresholds: list[float], norms: list[torch.Tensor]):
    """An FFN edit zeroing, per token, the neurons whose output magnitude is below the layer's threshold."""
    def edit(layer: int, a: torch.Tensor) -> torch.Tensor:
        keep = indicator("output", a, norms[layer]) >= thresholds[layer]
        return a * keep
    return edit


def cett(a: torch.Tensor, down_weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """CETT of each token (rows of `a`, [tokens, neurons]) at `threshold`."""
    return _Truncation(a, down_weight).cett(threshold)


class _Truncation:
    """One layer's token activations with what every CETT evaluation reuses."""

    def __init__(self, a: torch.Tensor, down_weight: torch.Tensor):
        self.a, self.weight = a.float(), down_weight.float()
        self.magnitude = indicator("output", self.a, column_norms(self.weight))
        full = (self.a @ self.weight.T).norm(dim=-1)
        self.full = full.clamp_min(torch.finfo(full.dtype).tiny)

    def cett(self, threshold: float) -> torch.Tensor:
        dropped = self.a * (self.magnitude < threshold)
        return (dropped @ self.weight.T).norm(dim=-1) / self.full


@dataclass(frozen=True)
class CettThreshold:
    threshold: float
    cett: float          # mean CETT over the calibration tokens at `threshold`
    sparsity: float      # mean fraction of neurons dropped per token


def cett_threshold(a: torch.Tensor, down_weight: torch.Tensor, target: float,
                   iterations: int = 30) -> CettThreshold:
    """The threshold at which the mean CETT over the tokens of `a` reaches `target`, by bisection.

    CETT grows from 0 (nothing dropped) to 1 (everything dropped) as the threshold rises;
    the upper end of the final bracket is returned, whose CETT is at least `target` (the
    dropped outputs add as vectors, so CETT is monotone only in practice)."""
    layer = _Truncation(a, down_weight)
    low, high = 0.0, float(layer.magnitude.max()) * (1 + 1e-6) + 1e-12
    for _ in range(iterations):
        middle = (low + high) / 2
        if float(layer.cett(middle).mean()) < target:
            low = middle
        else:
            high = middle
    sparsity = float((layer.magnitude < high).float().mean())
    return CettThreshold(high, float(layer.cett(high).mean()), sparsity)
