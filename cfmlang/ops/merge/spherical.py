"""Spherical merges: slerp, nuslerp, multislerp and karcher (mergekit 0.1.5 semantics).

Each method treats a whole tensor (or, for nuslerp, each of its rows or columns) as one
vector on a hypersphere, so none of them is elementwise. Arithmetic is done in the
inputs' common dtype, as mergekit does, except where noted (slerp and the norms of
karcher work in float32, or float64 for float64 inputs).
"""
from __future__ import annotations

from functools import reduce
from typing import Annotated

import torch
from pydantic import Field

from cfmlang.ops.merge.base import MergeContext, MergeError, MergeMethod, WeightedInput, working_dtype
from cfmlang.ops.registry import Gradient, Params, Range, register

SLERP_DOT_THRESHOLD = 0.9995
"""slerp interpolates linearly once |cos(angle)| between the two tensors exceeds this."""
SLERP_NORM_EPS = 1e-8
"""slerp treats a norm at or below this as 1 (a zero tensor stays zero)."""
SLERP_CHUNK_ELEMENTS = 1024 * 1024
"""slerp reduces norms and dot products over chunks of this many elements, combining
the per-chunk results afterwards; the same chunking gives the same rounding."""
NUSLERP_NORM_FLOOR = 1e-7
"""nuslerp divides by at least this when it normalises a vector."""
NUSLERP_COLINEAR_EPS = 1e-8
"""nuslerp interpolates linearly where 1 - cos^2 <= this squared."""
NUSLERP_ZERO_TOTAL = 1e-6
"""nuslerp uses t = 0.5 when the two weights sum to less than this in magnitude."""


class NoInputParams(Params):
    """Inputs of a method that takes no per-input parameters."""


# ---- shared pieces -----------------------------------------------------------------------

def in_common_dtype(tensors: list[torch.Tensor], base: torch.Tensor | None):
    """The inputs and base cast to their promoted dtype (mergekit merges each tensor
    group in one dtype)."""
    group = tensors + ([base] if base is not None else [])
    dtype = reduce(torch.promote_types, (t.dtype for t in group))
    cast = [t.to(dtype) for t in tensors]
    return cast, (base.to(dtype) if base is not None else None)


def require_floating(method: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{method} merging needs floating-point tensors")


# ---- slerp -----------------------------------------------------------------------------------

def column_chunks(width: int) -> list[slice]:
    return [slice(start, start + SLERP_CHUNK_ELEMENTS)
            for start in range(0, width, SLERP_CHUNK_ELEMENTS)]


def chunked_norm(row: torch.Tensor, chunks: list[slice], dtype: torch.dtype) -> torch.Tensor:
    """The norm of a [1, n] row as the norm of its chunks' norms; a norm at or below
    SLERP_NORM_EPS becomes 1."""
    parts = [torch.linalg.vector_norm(row[:, cols].to(dtype), dim=1, keepdim=True)
             for cols in chunks]
    norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return torch.where(norm > SLERP_NORM_EPS, norm, 1)


def slerp(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `start` (t = 0) to `end` (t = 1), each tensor taken
    whole as one vector. Nearly parallel or antiparallel pairs are interpolated
    linearly; the norms are interpolated along with the direction."""
    dtype = working_dtype(start)
    a, b = start.reshape(1, -1), end.reshape(1, -1)
    t_value = torch.tensor([[t]], dtype=dtype)
    if a.shape[1] == 0:
        return ((1 - t_value) * a + t_value * b).reshape(start.shape).to(start.dtype)
    chunks = column_chunks(a.shape[1])
    norm_a, norm_b = chunked_norm(a, chunks, dtype), chunked_norm(b, chunks, dtype)
    # normalise before multiplying, so that the raw dot product cannot overflow
    dots = [(a[:, cols].to(dtype) / norm_a * (b[:, cols].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
            for cols in chunks]
    cos = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    nearly_parallel = cos.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(nearly_parallel, 0, cos))
    sin_theta = torch.sin(theta)
    coef_start = torch.where(nearly_parallel, 1 - t_value, torch.sin((1 - t_value) * theta) / sin_theta)
    coef_end = torch.where(nearly_parallel, t_value, torch.sin(t_value * theta) / sin_theta)
    result = torch.empty_like(a)
    for cols in chunks:
        result[:, cols] = coef_start * a[:, cols].to(dtype) + coef_end * b[:, cols].to(dtype)
    return result.reshape(start.shape)


@register
class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation from the base (t = 0) to one other model (t = 1)"
    base = "required"
    base_role = "the model at t = 0, which slerp interpolates from (the input is at t = 1)"
    elementwise = False
    min_inputs = max_inputs = 1

    class Options(Params):
        t: Annotated[Gradient, Range(0, 1)]

    Input = NoInputParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        (other,), base = in_common_dtype(tensors, base)
        require_floating("slerp", base)
        return slerp(options["t"], base, other)


# ---- nuslerp ---------------------------------------------------------------------------------

def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """x divided by the norm of each vector along its last axis (floored)."""
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)


def vector_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool,
                 row_wise: bool) -> torch.Tensor:
    """Slerp between v0 (t = 0) and v1 (t = 1) without renormalising: the whole tensor
    as one vector when `flatten`, else each vector along the last axis, or along the
    first axis when `row_wise`. Exactly colinear vectors are interpolated linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(unit_vectors(v0) * unit_vectors(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_COLINEAR_EPS ** 2
    # keep the unused spherical branch finite where the vectors are colinear
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_t(first_weight: float, second_weight: float) -> float:
    """The interpolation parameter from the two inputs' weights: the second's share."""
    total = first_weight + second_weight
    return 0.5 if abs(total) < NUSLERP_ZERO_TOTAL else second_weight / total


@register
class Nuslerp(MergeMethod):
    name = "nuslerp"
    summary = ("slerp of two models at t = w2 / (w1 + w2), of their task vectors when a base "
               "is given; whole tensors, rows or columns")
    base = "optional"
    elementwise = False
    min_inputs = max_inputs = 2

    class Options(Params):
        nuslerp_flatten: bool = True
        nuslerp_row_wise: bool = False

    Input = WeightedInput

    @staticmethod
    def merge(tensors, base, weights, options, context):
        (first, second), base = in_common_dtype(tensors, base)
        t = nuslerp_t(weights[0]["weight"], weights[1]["weight"])
        shape = dict(flatten=options["nuslerp_flatten"], row_wise=options["nuslerp_row_wise"])
        if base is None:
            return vector_slerp(t, first, second, **shape)
        return base + vector_slerp(t, first - base, second - base, **shape)


# ---- multislerp ------------------------------------------------------------------------------

def multislerp(stacked: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted barycentre of the rows of `stacked` [n, ...] on the hypersphere: the
    unit rows are projected onto the tangent space at their normalised weighted mean,
    averaged there, mapped back with the exponential map and scaled to the weighted
    mean norm. None when the weighted mean of the unit rows vanishes."""
    rows = stacked.reshape(stacked.shape[0], -1)
    column = weights.view(-1, 1)
    norms = torch.norm(rows, dim=-1, keepdim=True)
    units = rows / (norms + eps)
    mean = (units * column).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        return None
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * column).sum(0)
    length = torch.norm(tangent) + eps
    on_sphere = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    return (on_sphere * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])


@register
class Multislerp(MergeMethod):
    name = "multislerp"
    summary = ("weighted spherical barycentre of any number of models (of their task vectors "
               "when a base is given)")
    base = "optional"
    elementwise = False

    class Options(Params):
        normalize_weights: bool = True
        eps: Annotated[Gradient, Range(0, low_open=True)] = 1e-8

    Input = WeightedInput

    @staticmethod
    def merge(tensors, base, weights, options, context):
        tensors, base = in_common_dtype(tensors, base)
        if len(tensors) == 1:
            return tensors[0]
        stacked = torch.stack(tensors)
        if base is not None:
            stacked -= base
        coefficients = torch.tensor([w["weight"] for w in weights], dtype=stacked.dtype)
        if options["normalize_weights"]:
            coefficients = coefficients / coefficients.sum()
        result = multislerp(stacked, coefficients, options["eps"])
        if result is None:
            result = antipodal_fallback(stacked, coefficients, context)
        return result if base is None else result + base


def antipodal_fallback(stacked: torch.Tensor, coefficients: torch.Tensor,
                       context: MergeContext) -> torch.Tensor:
    """When the weighted unit vectors cancel: two inputs are mixed linearly; more have
    no meaningful spherical mean."""
    if stacked.shape[0] == 2:
        return (stacked[0] * coefficients[0] + stacked[1] * coefficients[1]).view(stacked.shape[1:])
    raise MergeError("the weighted directions cancel out, so they have no spherical mean",
                     "this happens with antipodal inputs whose weights balance exactly; change the weights")


# ---- karcher ---------------------------------------------------------------------------------

def zeros_like_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum(t * 0): zeros, keeping the NaNs of the inputs."""
    total = torch.zeros_like(tensors[0])
    for tensor in tensors:
        total = total + tensor * 0
    return total


def tangent_at(mean: torch.Tensor, units: list[torch.Tensor], share: float,
               tol: float) -> torch.Tensor:
    """The weighted mean of the log maps of `units` at `mean` (a tangent vector);
    points closer than `tol` radians to the mean contribute nothing."""
    tangent = torch.zeros_like(mean)
    for unit in units:
        cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
        theta = torch.arccos(cos)
        if theta.item() < tol:
            continue
        tangent += share * (theta / torch.sin(theta)) * (unit - cos * mean)
    return tangent


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equally weighted Karcher (Frechet) mean of the tensors' directions on the unit
    sphere, found by Riemannian gradient steps, scaled by the mean of their norms.
    Inputs with a norm at or below `tol` take no part in the direction."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = working_dtype(tensors[0])
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype)
             for t, n in zip(tensors, norms)]
    kept = [unit for unit, n in zip(units, norms) if n.item() > tol]
    if not kept:
        return zeros_like_sum(tensors)
    share = alpha / sum(alpha for _ in kept)
    mean = torch.zeros_like(kept[0])
    for unit in kept:
        mean += share * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = kept[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = tangent_at(mean, kept, share, tol)
        step = torch.linalg.vector_norm(tangent.to(dtype))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(dtype))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    scale = sum(alpha * n for n in norms)
    return scale * mean


@register
class Karcher(MergeMethod):
    name = "karcher"
    summary = ("Karcher mean of the models' directions on the sphere, scaled by their mean "
               "norm (mergekit's base_model is just one more input)")
    elementwise = False

    class Options(Params):
        max_iter: int = Field(10, ge=0)
        tol: Annotated[Gradient, Range(0, low_open=True)] = 1e-5

    Input = NoInputParams

    @staticmethod
    def merge(tensors, base, weights, options, context):
        tensors, _ = in_common_dtype(tensors, None)
        return karcher_mean(tensors, options["max_iter"], options["tol"])
