"""Building routers for one expert-partitioned FFN (weights already in expert order).

- similarity: expert centres, the mean normalized gate row of each expert (MoEfication's
  parameter centres); no data needed.
- mlp: MoEfication's learned router, w2 tanh(w1 x^), w1 initialised with the centres and
  w2 with the identity, trained with binary cross-entropy to predict each expert's
  activation mass (scaled per token by its largest) on calibration hidden states.
- quantized: a 4-bit copy of every neuron's gate and up rows; the router computes each
  expert's activation mass from it (no data needed). With one neuron per expert it picks
  nearly the true top-k neurons, at the cost of an eighth of gate/up's fp32 bytes.
- oracle: no tensors; the routed FFN computes every expert's true mass (analysis only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cfmlang.runtime.routed_mlp import (MlpRouter, QuantizedRouter, SimilarityRouter, expert_mass,
                                        neuron_rows, quantize_rows)

BATCH = 256
LEARNING_RATE = 0.01
HELD_OUT = 0.1


@dataclass(frozen=True)
class BuiltRouter:
    tensors: dict[str, torch.Tensor]      # what routing.safetensors stores for the layer
    captured: float | None                # share of the oracle's top-k mass it captures (held out)


def centres(gate_up: torch.Tensor) -> torch.Tensor:
    """[E, d]: each expert's mean normalized gate row (gate_up packed as [E, d, 2m])."""
    size = gate_up.shape[-1] // 2
    return F.normalize(gate_up[:, :, :size].float(), dim=1).mean(2)


def captured_mass(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Mean over tokens of (true mass of the experts `scores` picks) / (mass of the true top-k)."""
    picked = mass.gather(1, scores.topk(k, dim=1).indices).sum(1)
    best = mass.topk(k, dim=1).values.sum(1).clamp_min(1e-12)
    return float((picked / best).mean())


def build_router(kind: str, gate_up: torch.Tensor, act, inputs: torch.Tensor | None, k: int,
                 epochs: int, seed: int) -> BuiltRouter:
    """The router of `kind` for packed weights `gate_up` [E, d, 2m]; `inputs` are the
    calibration FFN inputs [T, d] (needed by mlp, used by the others to report quality)."""
    gate_up = gate_up.float()
    mass = expert_mass(inputs.float(), gate_up, act) if inputs is not None else None
    cut = int(len(inputs) * (1 - HELD_OUT)) if inputs is not None else 0
    if kind == "oracle":
        return BuiltRouter({}, None if mass is None else 1.0)
    start = centres(gate_up)
    if kind == "similarity":
        router = SimilarityRouter(start)
        tensors = {"centres": start}
    elif kind == "quantized":
        tensors = quantize_rows(neuron_rows(gate_up))
        router = QuantizedRouter(**tensors, act=act, count=gate_up.shape[0])
    else:
        w1, w2 = train_mlp(inputs[:cut].float(), mass[:cut], start, epochs, seed)
        router = MlpRouter(w1, w2)
        tensors = {"w1": w1, "w2": w2}
    if mass is None:
        return BuiltRouter(tensors, None)
    with torch.no_grad():
        quality = captured_mass(router(inputs[cut:].float()), mass[cut:], k)
    return BuiltRouter(tensors, quality)


def train_mlp(inputs: torch.Tensor, mass: torch.Tensor, start: torch.Tensor, epochs: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w1 = start.clone().requires_grad_(True)
    w2 = torch.eye(start.shape[0]).requires_grad_(True)
    optimizer = torch.optim.Adam([w1, w2], lr=LEARNING_RATE)
    unit = F.normalize(inputs, dim=-1)
    target = mass / mass.amax(dim=1, keepdim=True).clamp_min(1e-12)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(unit), generator=generator).split(BATCH):
                optimizer.zero_grad()
                logits = torch.tanh(unit[batch] @ w1.t()) @ w2.t()
                F.binary_cross_entropy_with_logits(logits, target[batch]).backward()
                optimizer.step()
    return w1.detach(), w2.detach()
