"""mergekit's generalized task arithmetic family: TIES, DARE, Model Breadcrumbs, DELLA.

Each method merges task vectors (input - base) in three steps:

1. sparsify every task vector: keep its largest entries (TIES), a random share (DARE), a
   band of magnitudes without the outliers (Breadcrumbs) or a random share whose keep
   probability grows with magnitude rank (DELLA); with `rescale`, the kept part is
   scaled back to the L1 norm of the whole task vector;
2. multiply each by its `weight`; the TIES-style methods then keep only the entries
   whose sign agrees with the sign of the weighted sum (sign consensus);
3. sum, divide by the sum of the (kept) weights when `normalize`, multiply by `lambda`
   and add to the base.

Parameter names, defaults and math follow mergekit 0.1.5. Random masks come from the
per-tensor generator of the merge context, never from the global RNG.
"""
from __future__ import annotations

from typing import Annotated, Callable, ClassVar

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from cfmlang.ops.merge.base import MergeContext, MergeError, MergeMethod, working_dtype
from cfmlang.ops.registry import Gradient, Params, Range, interpolate, register

NORM_FLOOR = 1e-7
"""Below this L1 norm a task vector (or what is kept of it) is not rescaled."""
WEIGHT_SUM_FLOOR = 1e-8
"""Without sign consensus, a sum of weights this close to zero does not divide."""

Sparsifier = Callable[[torch.Tensor, dict, bool, torch.Generator], torch.Tensor]


# ---- sparsification -------------------------------------------------------------------
def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` scaled so that its L1 norm equals the L1 norm of `delta`; left as is when
    either norm is (nearly) zero. Norms are taken in float32 at least, so that 16-bit
    tensors cannot overflow."""
    work = working_dtype(delta)
    norm_before = delta.abs().sum(dtype=work)
    norm_after = kept.abs().sum(dtype=work)
    if norm_before < NORM_FLOOR or norm_after < NORM_FLOOR:
        return kept
    return (kept.to(work) * (norm_before / norm_after)).to(kept.dtype)


def apply_mask(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * keep
    return l1_rescaled(delta, kept) if rescale else kept


def ranking_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened, in float32: the values mergekit ranks CPU tensors by."""
    return delta.abs().reshape(-1).float()


def mask_of(indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean tensor shaped like `like`, True at the given flat indices."""
    keep = torch.zeros(like.numel(), dtype=torch.bool)
    keep[indices] = True
    return keep.view(like.shape)


def keep_largest(delta: torch.Tensor, params: dict, rescale: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """TIES: keep the `density` share of entries with the largest magnitude (at least
    one when density > 0)."""
    density = params["density"]
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    count = max(1, int(density * delta.numel()))
    return apply_mask(delta, largest_mask(ranking_magnitudes(delta), count).view(delta.shape), rescale)


def largest_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` largest of the flat `magnitudes`.

    A selection (kthvalue, linear time) finds the cut; when every value equal to the cut
    fits among the kept ones, the kept set is unique and this is the answer. Only when
    equal values straddle the cut does the choice among them depend on the sort order,
    and then the full descending argsort decides, as in mergekit."""
    total = magnitudes.numel()
    if count >= total:
        return torch.ones(total, dtype=torch.bool)
    cut = torch.kthvalue(magnitudes, total - count + 1).values
    above = magnitudes > cut
    if int(above.sum()) + int((magnitudes == cut).sum()) == count:
        return above | (magnitudes == cut)
    largest_first = torch.argsort(magnitudes, descending=True)
    return mask_of(largest_first[:count], magnitudes)


def keep_magnitude_band(delta: torch.Tensor, params: dict, rescale: bool,
                        generator: torch.Generator) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` share of largest magnitudes (the outliers),
    then the smallest ones, keeping a `density` share. When density and gamma add up to
    more than 1, fewer outliers are dropped."""
    density = params["density"]
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    total = delta.numel()
    kept_count = int(density * total)
    outlier_count = int(params["gamma"] * total)
    smallest_dropped = max(0, total - kept_count - outlier_count)
    smallest_first = torch.argsort(ranking_magnitudes(delta))
    band = smallest_first[smallest_dropped:smallest_dropped + kept_count]
    return apply_mask(delta, mask_of(band, delta), rescale)


def keep_at_random(delta: torch.Tensor, params: dict, rescale: bool,
                   generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    density = params["density"]
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return apply_mask(delta, keep, rescale)


def rank_fractions(magnitudes: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank along dim 1, scaled to [0, 1]: 0 for the smallest of
    its row, 1 for the largest (0.5 for a row of one)."""
    row_length = magnitudes.shape[1]
    if row_length == 1:
        return torch.full(magnitudes.shape, 0.5)
    ranks = magnitudes.argsort(dim=1).argsort(dim=1)
    return ranks.to(torch.float32) / (row_length - 1)


def keep_by_magnitude_rank(delta: torch.Tensor, params: dict, rescale: bool,
                           generator: torch.Generator) -> torch.Tensor:
    """DELLA (MagPrune): keep each entry with a probability that rises linearly with its
    magnitude rank in its row, from density - epsilon to density + epsilon."""
    density, epsilon = params["density"], params["epsilon"]
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    probability = (density - epsilon) + rank_fractions(rows.abs()) * (2 * epsilon)
    keep = torch.rand(rows.shape, generator=generator) < probability
    return apply_mask(rows, keep, rescale).reshape(delta.shape)


def della_bounds_problem(density: float, epsilon: float) -> str | None:
    """Why DELLA cannot use these values, or None: while 0 < density < 1, the keep
    probabilities density - epsilon .. density + epsilon must lie inside (0, 1)."""
    if density >= 1 or density <= 0:
        return None
    if density - epsilon <= 0 or density + epsilon >= 1:
        return (f"density - epsilon and density + epsilon must both lie strictly between "
                f"0 and 1, but density {density:g} and epsilon {epsilon:g} give "
                f"{density - epsilon:g} and {density + epsilon:g}")
    return None


def gradient_breakpoints(*values) -> list[float]:
    """The layer positions t at which the given gradients change slope (and 0 and 1)."""
    points = {0.0, 1.0}
    for value in values:
        if isinstance(value, list) and len(value) > 1:
            points.update(i / (len(value) - 1) for i in range(len(value)))
    return sorted(points)


def filter_entries(value) -> list:
    """The values a parameter can take: each entry of a tensor-name filter map, or itself."""
    return list(value.values()) if isinstance(value, dict) else [value]


# ---- sign consensus -------------------------------------------------------------------
def sign_agreement(deltas: torch.Tensor, method: str = "sum",
                   int8_votes: bool = False) -> torch.Tensor:
    """For task vectors stacked on dim 0, True where an entry's sign equals the elected
    sign of its position. The elected sign is that of the sum of the entries ("sum",
    TIES) or of the sum of their signs ("count"); a tie elects +. Zero entries never
    agree. `int8_votes` holds the signs in int8 instead of the tensors' dtype."""
    vote_dtype = torch.int8 if int8_votes else deltas.dtype
    signs = deltas.sign().to(vote_dtype)
    if method == "sum":
        elected_positive = deltas.sum(dim=0) >= 0
    elif method == "count":
        elected_positive = signs.sum(dim=0) >= 0
    else:
        raise ValueError(f"unknown sign consensus {method!r} (use 'sum' or 'count')")
    elected = elected_positive.to(vote_dtype) * 2 - 1
    return signs == elected


# ---- the merge ------------------------------------------------------------------------
def merge_task_vectors(tensors: list[torch.Tensor], base: torch.Tensor, weights: list[dict],
                       options: dict, generator: torch.Generator, sparsify: Sparsifier,
                       consensus: str | None) -> torch.Tensor:
    """base + lambda * (sum of the weighted, sparsified and, with a consensus, sign-agreeing
    task vectors), divided by the sum of the weights that contributed when `normalize`."""
    if not tensors:
        return base
    deltas = torch.empty((len(tensors), *base.shape), dtype=base.dtype)
    for row, (tensor, params) in enumerate(zip(tensors, weights)):
        deltas[row] = sparsify(tensor - base, params, options["rescale"], generator)
    coefficients = torch.tensor([p["weight"] for p in weights], dtype=deltas.dtype)
    coefficients = coefficients.reshape((-1,) + (1,) * base.ndim)
    deltas.mul_(coefficients)
    if consensus is None:
        mixed = deltas.sum(dim=0)
        divisor = coefficients.sum(dim=0)
        divisor[divisor.abs() < WEIGHT_SUM_FLOOR] = 1
    else:
        agree = sign_agreement(deltas, consensus, options["int8_mask"])
        mixed = (deltas * agree).sum(dim=0)
        divisor = (coefficients * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    if options["normalize"]:
        mixed /= divisor
    if options["lambda"] != 1:
        mixed *= options["lambda"]
    return (base + mixed).to(base.dtype)


class TaskVectorOptions(Params):
    normalize: bool = False
    rescale: bool = False
    lambda_: Gradient = Field(1.0, alias="lambda")
    int8_mask: bool = False


class TaskVectorInput(Params):
    weight: Gradient
    density: Annotated[Gradient, Range(0, 1)] = 1.0


class BreadcrumbsInput(TaskVectorInput):
    gamma: Annotated[Gradient, Range(0, 1)] = 0.01


class DellaInput(TaskVectorInput):
    epsilon: Annotated[Gradient, Range(0, 1)] = 0.15

    @model_validator(mode="after")
    def probabilities_in_range(self):
        """Check every density/epsilon pair that is sure to meet on some tensor, at each
        point of their gradients. When both are filter maps, which entries meet depends
        on tensor names: the merge itself checks those."""
        if isinstance(self.density, dict) and isinstance(self.epsilon, dict):
            return self
        for density in filter_entries(self.density):
            for epsilon in filter_entries(self.epsilon):
                is_gradient = isinstance(density, list) or isinstance(epsilon, list)
                for t in gradient_breakpoints(density, epsilon):
                    problem = della_bounds_problem(interpolate(density, t), interpolate(epsilon, t))
                    if problem:
                        where = f" at layer position t = {t:g}" if is_gradient else ""
                        raise PydanticCustomError("della_bounds", problem + where)
        return self


class TaskVectorMerge(MergeMethod):
    """The shared machinery; each method picks a sparsifier and a sign consensus."""

    base = "required"
    elementwise = False
    Input = TaskVectorInput
    sparsify: ClassVar[Sparsifier]
    consensus: ClassVar[str | None] = None

    @classmethod
    def merge(cls, tensors, base, weights, options, context: MergeContext):
        return merge_task_vectors(tensors, base, weights, options, context.generator(),
                                  cls.sparsify, cls.consensus)


@register
class Ties(TaskVectorMerge):
    name = "ties"
    summary = "TIES: keep each task vector's largest entries, elect signs, merge the agreeing ones"
    sparsify = staticmethod(keep_largest)
    consensus = "sum"

    class Options(TaskVectorOptions):
        normalize: bool = True


@register
class DareTies(TaskVectorMerge):
    name = "dare_ties"
    summary = "DARE with TIES sign consensus: random drop and rescale, then elect signs"
    sparsify = staticmethod(keep_at_random)
    consensus = "sum"

    class Options(TaskVectorOptions):
        rescale: bool = True


@register
class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    summary = "DARE: randomly drop task-vector entries, rescale, add up"
    sparsify = staticmethod(keep_at_random)

    class Options(TaskVectorOptions):
        rescale: bool = True


@register
class Breadcrumbs(TaskVectorMerge):
    name = "breadcrumbs"
    summary = "Model Breadcrumbs: drop the largest (outliers) and smallest task-vector entries"
    sparsify = staticmethod(keep_magnitude_band)
    Input = BreadcrumbsInput
    Options = TaskVectorOptions


@register
class BreadcrumbsTies(TaskVectorMerge):
    name = "breadcrumbs_ties"
    summary = "Model Breadcrumbs with TIES sign consensus"
    sparsify = staticmethod(keep_magnitude_band)
    consensus = "sum"
    Input = BreadcrumbsInput
    Options = TaskVectorOptions


class DellaMerge(TaskVectorMerge):
    """DELLA's sparsifier; it refuses density/epsilon pairs a gradient reaches between
    the points the checker could verify."""

    sparsify = staticmethod(keep_by_magnitude_rank)
    Input = DellaInput

    @classmethod
    def merge(cls, tensors, base, weights, options, context: MergeContext):
        for params in weights:
            problem = della_bounds_problem(params["density"], params["epsilon"])
            if problem:
                raise MergeError(f"cannot sparsify: {problem}",
                                 "keep density - epsilon >= 0 and density + epsilon <= 1 on every layer")
        return super().merge(tensors, base, weights, options, context)


@register
class Della(DellaMerge):
    name = "della"
    summary = "DELLA: magnitude-ranked random drop and rescale, then TIES sign consensus"
    consensus = "sum"

    class Options(TaskVectorOptions):
        normalize: bool = True
        rescale: bool = True


@register
class DellaLinear(DellaMerge):
    name = "della_linear"
    summary = "DELLA without sign consensus: magnitude-ranked random drop, rescale, add up"

    class Options(TaskVectorOptions):
        rescale: bool = True
