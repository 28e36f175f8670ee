"""Merge methods outside the linear and TIES/DARE families: model_stock, nearswap, sce,
arcee_fusion, ram, ramplus_tl and passthrough (mergekit 0.1.5 semantics).

Each method computes in the dtype its tensors arrive in (the node's `dtype:` when one is
set), as mergekit does with its promoted input dtype. Input counts that mergekit
enforces are declared as `min_inputs`/`max_inputs` (counted over the inputs that are
not the base) and checked again when a tensor is merged.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from cfmlang.ops.merge.base import MergeMethod, input_count_problem
from cfmlang.ops.merge.sparse import sign_agreement
from cfmlang.ops.registry import Gradient, NoParams, Params, Range, register


def require_input_count(method: type[MergeMethod], tensors: list) -> None:
    """Refuse a merge whose number of non-base inputs is outside the method's range
    (the checker reports this before any weight is read; this guards direct calls)."""
    problem = input_count_problem(method, len(tensors))
    if problem:
        raise ValueError(problem)


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Each input's difference from the base, stacked along a new leading axis."""
    return torch.stack([tensor - base for tensor in tensors], dim=0)


# ---- model_stock ------------------------------------------------------------------------

def as_filters(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The tensor as rows whose last axis the angles are measured along: its own rows
    (a vector counts as one row) when filter-wise, else one flat vector."""
    if not filter_wise:
        return tensor.reshape(-1)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """The cosine between every pair of offsets along the last axis, averaged over
    pairs, with a trailing axis of one to broadcast over each filter."""
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1:]:
            norm_product = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            dot = (first * second).sum(dim=-1)
            cosines.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock_ratio(cosine: torch.Tensor, count: int) -> torch.Tensor:
    """How far to move from the base toward the inputs' average: N cos / (1 + (N-1) cos),
    or 0 (keep the base) where the denominator vanishes."""
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cosine), (count * cosine) / safe_denominator)


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "interpolate base -> average of the inputs by the angle between their task vectors"
    base = "required"
    base_role = "the model interpolated towards the average of the inputs"
    elementwise = False
    min_inputs = 2

    class Options(Params):
        filter_wise: bool = False

    Input = NoParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        require_input_count(ModelStock, tensors)
        anchor = as_filters(base, options["filter_wise"])
        tuned = [as_filters(tensor, options["filter_wise"]) for tensor in tensors]
        ratio = model_stock_ratio(mean_pairwise_cosine([w - anchor for w in tuned]), len(tuned))
        average = sum(tuned) / len(tuned)
        return (ratio * average + (1 - ratio) * anchor).reshape(base.shape)


# ---- nearswap -----------------------------------------------------------------------------

@register
class NearSwap(MergeMethod):
    name = "nearswap"
    summary = "take the input's value where it is within about t of the base's"
    base = "required"
    base_role = "the model whose values the input's replace where they are near"
    min_inputs = max_inputs = 1

    class Options(Params):
        t: Annotated[Gradient, Range(0)]

    Input = NoParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        require_input_count(NearSwap, tensors)
        other = tensors[0]
        distance = (base - other).abs().clamp(min=1e-6)
        share = (options["t"] / distance).clamp(min=0, max=1)
        return share * other + (1 - share) * base


# ---- sce ----------------------------------------------------------------------------------

def variance_topk_mask(deltas: torch.Tensor, fraction: float, dtype: torch.dtype) -> torch.Tensor:
    """1 on the `fraction` of elements (of those with any spread) where the inputs'
    task vectors vary most across inputs, 0 elsewhere."""
    shape = deltas.shape[1:]
    if fraction <= 0:
        return torch.zeros(shape, dtype=dtype)
    if fraction >= 1:
        return torch.ones(shape, dtype=dtype)
    variance = torch.var(deltas, dim=0, unbiased=False)
    # counted and scaled as a float32 tensor, then truncated, as mergekit does
    kept = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros(shape, dtype=dtype)
    if kept == 0:
        return mask
    top = torch.topk(variance.reshape(-1), k=kept, largest=True).indices
    mask.view(-1)[top] = 1
    return mask


def energy_shares(deltas: torch.Tensor) -> torch.Tensor:
    """Each input's mean squared task vector as a share of the total (equal shares
    when the total is below 1e-6)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


@register
class SCE(MergeMethod):
    name = "sce"
    summary = "select high-variance elements, weight task vectors by energy, erase minority signs"
    base = "required"
    elementwise = False
    min_inputs = 0

    class Options(Params):
        int8_mask: bool = False
        select_topk: Annotated[Gradient, Range(0, 1, low_open=True)] = 1.0

    Input = NoParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        if not tensors:
            return base
        mask_dtype = torch.int8 if options["int8_mask"] else base.dtype
        deltas = task_vectors(tensors, base)
        if options["select_topk"] < 1:
            deltas = deltas * variance_topk_mask(deltas, options["select_topk"], mask_dtype).unsqueeze(0)
        agreeing = sign_agreement(deltas, "sum", int8_votes=options["int8_mask"])
        shares = energy_shares(deltas).reshape((-1,) + (1,) * base.dim())
        kept = shares * agreeing
        merged = (deltas * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
        return base + merged


# ---- arcee_fusion -------------------------------------------------------------------------

QUANTILE_SAMPLE_SIZE = 1_000_000
"""Above this many elements the quantiles are taken on a random sample (with
replacement) of this size."""


def kl_weighted_change(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|tuned - base| scaled by KL(softmax(tuned) || softmax(base)) along the last axis."""
    eps = 1e-8
    p = F.softmax(tuned, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (tuned - base).abs() * divergence


def quartiles(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Lower quartile, median and upper quartile, each the sorted element at
    floor(q * (n - 1)) (no interpolation), on a sample when the tensor is large."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    # float32 positions, as mergekit computes them
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    return ordered[positions.to(ordered.device)]


def outlier_threshold(importance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Tukey's upper fence measured from the median: median + 1.5 * (Q3 - Q1)."""
    lower, median, upper = quartiles(importance, generator)
    return median + 1.5 * (upper - lower)


@register
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "take the input's change only where its KL-weighted size is an outlier"
    base = "required"
    elementwise = False
    min_inputs = max_inputs = 1

    Input = NoParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        require_input_count(ArceeFusion, tensors)
        tuned = tensors[0]
        importance = kl_weighted_change(tuned, base)
        fused = (importance >= outlier_threshold(importance, context.generator())).float()
        return base + (tuned - base) * fused


# ---- ram and ramplus_tl ---------------------------------------------------------------------

def contributions(deltas: torch.Tensor, epsilon: float):
    """Which flattened task-vector elements count (|delta| > epsilon); per element, how
    many inputs contribute, and whether that is several (shared) or one (unique)."""
    active = deltas.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    return active, counts, counts > 1, counts == 1


@register
class RAM(MergeMethod):
    name = "ram"
    summary = "sum unique task-vector entries, average those several inputs share"
    base = "required"
    min_inputs = 0

    class Options(Params):
        epsilon: Annotated[Gradient, Range(0)] = 1e-5

    Input = NoParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        if not tensors:
            return base
        deltas = task_vectors(tensors, base).view(len(tensors), -1)
        active, counts, shared, unique = contributions(deltas, options["epsilon"])
        kept = deltas * active
        merged = ((kept * unique) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)


@register
class RAMPlusTensorLocal(MergeMethod):
    name = "ramplus_tl"
    summary = "ram, with each input's unique entries scaled up by its overlap ratio in the tensor"
    base = "required"
    elementwise = False
    min_inputs = 0

    class Options(Params):
        r: Annotated[Gradient, Range(0)] = 0.1
        alpha: Annotated[Gradient, Range(0)] = 0.2
        epsilon: Annotated[Gradient, Range(0, low_open=True)] = 1e-5

    Input = NoParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        if not tensors:
            return base
        deltas = task_vectors(tensors, base).view(len(tensors), -1)
        active, counts, shared, unique = contributions(deltas, options["epsilon"])
        shared_per_input = (active & shared).sum(dim=1)
        unique_per_input = (active & unique).sum(dim=1)
        overlap_ratio = shared_per_input / unique_per_input.clamp(min=options["epsilon"])
        boost = 1 + options["r"] * overlap_ratio.clamp(min=0, max=options["alpha"])
        kept = deltas * active
        merged = ((kept * unique * boost.unsqueeze(-1))
                  + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)


# ---- passthrough --------------------------------------------------------------------------

class ScaledInput(Params):
    scale: Gradient | None = None


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "copy the one input, optionally multiplied by `scale`"
    min_inputs = max_inputs = 1

    Input = ScaledInput

    @staticmethod
    def merge(tensors, base, weights, options, context):
        require_input_count(Passthrough, tensors)
        scale = weights[0]["scale"]
        return tensors[0] if scale is None else tensors[0] * scale
