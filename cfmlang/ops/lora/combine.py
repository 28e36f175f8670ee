"""Merges over LoRA bricks with the semantics of PEFT 0.21's `add_weighted_adapter`.

`cat` stacks the factors (rank = sum of ranks); `linear`, `ties`, `dare_linear`,
`dare_ties` and `magnitude_prune` combine the A factors and the B factors separately
with sqrt(|weight x scale|) weights (the sign on A); the `svd` variants combine the full
deltas scale * B @ A and factor the result back to `svd_rank` by SVD. Random drops
(DARE) come from one generator seeded with the merge's seed, visiting modules in model
order and, per module, the A factors then the B factors of each input in turn: PEFT's
order, so a PEFT run after `torch.manual_seed(seed)` draws the same masks.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from cfmlang.ops.lora.factors import LoraAdapter, LoraFactors, module_order, module_scale, peft_rank
from cfmlang.ops.registry import Method, Params, register

SUMMARIES = {
    "cat": "concatenate the factors (exact; rank = sum of ranks)",
    "linear": "weighted sum of A and of B factors (same ranks)",
    "svd": "weighted sum of deltas, refactored by SVD to `svd_rank`",
    "ties": "TIES on A and on B factors (same ranks)",
    "ties_svd": "TIES on deltas, refactored by SVD",
    "dare_linear": "DARE drop-and-rescale on A and B factors, summed (same ranks)",
    "dare_ties": "DARE drop-and-rescale with TIES sign election on factors (same ranks)",
    "dare_linear_svd": "DARE on deltas, summed, refactored by SVD",
    "dare_ties_svd": "DARE with TIES sign election on deltas, refactored by SVD",
    "magnitude_prune": "keep the largest `density` of each factor, summed (same ranks)",
    "magnitude_prune_svd": "keep the largest `density` of each delta, summed, refactored by SVD",
}
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")
ADAPTER_MERGE = "adapter_merge"
"""The registry keyword of these methods: `merge` statements whose inputs are LoRA bricks."""


class CombineOptions(Params):
    density: Annotated[float, Field(ge=0, le=1)] | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: Annotated[int, Field(ge=1)] | None = None
    svd_clamp: Annotated[float, Field(gt=0, le=1)] | None = None


class CombineInput(Params):
    weight: float = 1.0


class AdapterCombination(Method):
    keyword = ADAPTER_MERGE
    Options = CombineOptions
    Input = CombineInput


for _name, _summary in SUMMARIES.items():
    register(type(f"Combine_{_name}", (AdapterCombination,), {"name": _name, "summary": _summary}))


def merged_rank(combination: str, ranks: list[int], svd_rank: int | None) -> int:
    """The rank of the merged adapter (PEFT's rule); SAME_RANK methods need equal ranks."""
    if combination == "cat":
        return sum(ranks)
    if combination.endswith("svd"):
        return svd_rank or max(ranks)
    return ranks[0]


def effective_combination(combination: str, count: int) -> str:
    """PEFT merges a single adapter linearly whatever the method asked for."""
    return "linear" if count == 1 else combination


def combine(adapters: list[LoraAdapter], weights: list[float], combination: str, options: dict,
            seed: int) -> LoraAdapter:
    combination = effective_combination(combination, len(adapters))
    rank = merged_rank(combination, [peft_rank(a.config) for a in adapters], options.get("svd_rank"))
    config = merged_config([a.config for a in adapters], rank)
    generator = torch.Generator().manual_seed(seed)
    names = sorted({m for a in adapters for m in a.modules}, key=module_order)
    modules = {}
    for module in names:
        present = [(a.modules[module], w) for a, w in zip(adapters, weights) if module in a.modules]
        if combination == "cat":
            down, up = _cat(present, rank)
        elif combination.endswith("svd"):
            down, up = _svd(present, combination, rank, options, generator)
        else:
            down, up = _factorwise(present, combination, options, generator)
        modules[module] = LoraFactors(down, up, module_scale(config, module))
    return LoraAdapter(modules, config)


def merged_config(configs: list[dict], rank: int) -> dict:
    """The first input's configuration with the new rank, alpha = rank, no patterns and
    the union of the target modules (as PEFT writes it; note that use_rslora is kept)."""
    targets = [c.get("target_modules") or [] for c in configs]
    if any(isinstance(t, str) for t in targets):
        union = "|".join(f"({t})" if isinstance(t, str) else rf"((.*\.)?({'|'.join(t)})$)" for t in targets)
    else:
        union = sorted({m for t in targets for m in t})
    return {**configs[0], "r": rank, "lora_alpha": rank, "target_modules": union,
            "rank_pattern": {}, "alpha_pattern": {}}


def _cat(present: list[tuple[LoraFactors, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    downs = torch.cat([f.down * w * f.scale for f, w in present], dim=0)
    ups = torch.cat([f.up for f, _ in present], dim=1)
    down = torch.zeros(rank, downs.shape[1], dtype=downs.dtype)
    up = torch.zeros(ups.shape[0], rank, dtype=ups.dtype)
    down[: downs.shape[0]] = downs
    up[:, : ups.shape[1]] = ups
    return down, up


def _factorwise(present, combination: str, options: dict, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine A factors and B factors separately, the weight's square root on each
    (its sign on A only, so negative weights subtract)."""
    if len({f.down.shape for f, _ in present}) > 1:
        raise ValueError(f"{combination} needs equal ranks, but this module's ranks are "
                         f"{[f.down.shape[0] for f, _ in present]}")
    scaled = [w * f.scale for f, w in present]
    weights_down = torch.tensor([math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled])
    weights_up = torch.tensor([math.sqrt(abs(s)) for s in scaled])
    dtype = present[0][0].down.dtype
    down = mix(combination, [f.down for f, _ in present], weights_down, options, generator)
    up = mix(combination, [f.up for f, _ in present], weights_up, options, generator)
    return down.to(dtype), up.to(dtype)


def _svd(present, combination: str, rank: int, options: dict, generator) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [f.delta() for f, _ in present]
    weights = torch.tensor([w for _, w in present])
    delta = mix(combination.removesuffix("_svd") if combination != "svd" else "linear",
                deltas, weights, options, generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    up = u[:, :rank] @ torch.diag(s[:rank])
    down = vh[:rank, :]
    if options.get("svd_clamp") is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), options["svd_clamp"])
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return down, up


def mix(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, options: dict,
        generator: torch.Generator) -> torch.Tensor:
    """One weighted combination of same-shaped tensors: linear (task arithmetic), ties,
    dare_linear, dare_ties or magnitude_prune."""
    density = options.get("density")
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_drop_and_rescale(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        return _disjoint_mean(stacked, weighted, options["majority_sign_method"])
    return weighted.sum(dim=0)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    kept = torch.zeros_like(tensor).reshape(-1)
    kept[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
    return tensor * kept.reshape(tensor.shape)


def _drop_and_rescale(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return tensor
    kept = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * kept / density


def _disjoint_mean(stacked: torch.Tensor, weighted: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES: elect each element's sign (by total mass or by count), average the weighted
    values that agree with it."""
    signs = stacked.sign()
    mass = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agrees = signs == torch.where(mass >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)

