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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cfmlang.runtime.routed_mlp import (ROUTER_LOADERS, MlpRouter, QuantizedRouter, RouterLoader, SimilarityRouter,
                                        expert_mass, neuron_rows, quantize_rows)

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


@dataclass(frozen=True)
class RouterData:
    """What a router may be built from: the layer's packed FFN weights `gate_up`
    [E, d, 2m], its activation, the calibration FFN inputs [T, d] (None when the route
    needs no data), the route's k, training epochs and seed."""

    gate_up: torch.Tensor
    act: Callable
    inputs: torch.Tensor | None
    mass: torch.Tensor | None       # [T, E] each expert's true activation mass on `inputs`
    k: int
    epochs: int
    seed: int


RouterBuilder = Callable[[RouterData], tuple[dict[str, torch.Tensor], Optional[nn.Module]]]
"""Builds a layer's router: (tensors to store, the router module; None for no module)."""
ROUTER_BUILDERS: dict[str, RouterBuilder] = {}
NEEDS_DATA: set[str] = set()


def register_router(name: str, build: RouterBuilder, load: RouterLoader, needs_data: bool = False) -> None:
    """Add a router for `route NAME: {method: topk, router: NAME}`: `build` makes a layer's
    router at compile time, `load` rebuilds its module from the stored tensors when the
    artifact is loaded. `needs_data`: the builder needs calibration inputs."""
    if name in ROUTER_BUILDERS:
        raise ValueError(f"router `{name}` is registered twice")
    ROUTER_BUILDERS[name] = build
    ROUTER_LOADERS[name] = load
    if needs_data:
        NEEDS_DATA.add(name)


def build_router(kind: str, gate_up: torch.Tensor, act, inputs: torch.Tensor | None, k: int,
                 epochs: int, seed: int) -> BuiltRouter:
    """The router of `kind` for packed weights `gate_up` [E, d, 2m]; `inputs` are the
    calibration FFN inputs [T, d] (needed by mlp, used by the others to report quality)."""
    gate_up = gate_up.float()
    mass = expert_mass(inputs.float(), gate_up, act) if inputs is not None else None
    cut = int(len(inputs) * (1 - HELD_OUT)) if inputs is not None else 0
    data = RouterData(gate_up, act, None if inputs is None else inputs[:cut].float(),
                      None if mass is None else mass[:cut], k, epochs, seed)
    tensors, router = ROUTER_BUILDERS[kind](data)
    if mass is None:
        return BuiltRouter(tensors, None)
    if router is None:
        return BuiltRouter(tensors, 1.0)
    with torch.no_grad():
        quality = captured_mass(router(inputs[cut:].float()), mass[cut:], k)
    return BuiltRouter(tensors, quality)


def _similarity(data: RouterData):
    """Expert centres (the mean normalized gate row of each expert, MoEfication's); no data needed."""
    start = centres(data.gate_up)
    return {"centres": start}, SimilarityRouter(start)


def _quantized(data: RouterData):
    """A 4-bit copy of every neuron's gate and up rows ranks the experts by activation mass; no data needed."""
    tensors = quantize_rows(neuron_rows(data.gate_up))
    return tensors, QuantizedRouter(**tensors, act=data.act, count=data.gate_up.shape[0])


def _mlp(data: RouterData):
    """MoEfication's learned router w2 tanh(w1 x), trained on calibration text to predict each expert's mass."""
    w1, w2 = train_mlp(data.inputs, data.mass, centres(data.gate_up), data.epochs, data.seed)
    return {"w1": w1, "w2": w2}, MlpRouter(w1, w2)


def _oracle(data: RouterData):
    """No router: the FFN computes every expert's true mass and keeps the top k (analysis only)."""
    return {}, None


ROUTER_BUILDERS.update(similarity=_similarity, quantized=_quantized, mlp=_mlp, oracle=_oracle)
NEEDS_DATA.add("mlp")


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
