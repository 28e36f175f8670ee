"""Merge methods. Semantics and parameter names follow mergekit 0.1.5 exactly."""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from cfmlang.stdlib.registry import Gradient, Method, Params, planned, register


class MergeMethod(Method):
    keyword = "merge"
    needs_base: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True
    """True when each output element depends only on the same element of the inputs, so
    a tensor can be merged a block of rows at a time."""
    Input: ClassVar[type[Params]]

    @staticmethod
    def merge(tensors: list[torch.Tensor], base: torch.Tensor | None,
              weights: list[dict], options: dict) -> torch.Tensor:
        raise NotImplementedError


def working_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class WeightedInput(Params):
    weight: Gradient


@register
class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the inputs (model soup)"

    class Options(Params):
        normalize: bool = True

    Input = WeightedInput

    @staticmethod
    def merge(tensors, base, weights, options):
        first = tensors[0]
        if not first.is_floating_point():
            raise TypeError("linear merging needs floating-point tensors")
        dtype = working_dtype(first)
        coefficients = torch.tensor([w["weight"] for w in weights], dtype=dtype)
        result = torch.zeros_like(first, dtype=dtype)
        for tensor, coefficient in zip(tensors, coefficients):
            result.addcmul_(tensor, coefficient)
        if options["normalize"]:
            result.div_(coefficients.sum())
        return result.to(first.dtype)


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "base + lambda * sum(weight_i * (model_i - base))"
    needs_base = True

    class Options(Params):
        normalize: bool = False
        lambda_: float = Field(1.0, alias="lambda")

    Input = WeightedInput

    @staticmethod
    def merge(tensors, base, weights, options):
        if not tensors:
            return base
        deltas = torch.stack([tensor - base for tensor in tensors])
        coefficients = torch.tensor([w["weight"] for w in weights], dtype=deltas.dtype)
        deltas.mul_(coefficients.reshape((-1,) + (1,) * base.ndim))
        mixed = deltas.sum(dim=0)
        if options["normalize"]:
            divisor = coefficients.sum()
            mixed.div_(divisor if divisor.abs() >= 1e-8 else 1)
        if options["lambda"] != 1:
            mixed.mul_(options["lambda"])
        return (base + mixed).to(base.dtype)


planned("merge", "ties dare_ties dare_linear breadcrumbs breadcrumbs_ties della "
        "della_linear slerp nuslerp multislerp karcher model_stock nearswap sce "
        "passthrough arcee_fusion", "the merge issue")
