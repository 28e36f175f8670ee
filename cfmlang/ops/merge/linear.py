"""The basic merge methods: linear and task arithmetic (mergekit 0.1.5 semantics)."""
from __future__ import annotations

import torch
from pydantic import Field

from cfmlang.ops.merge.base import MergeMethod, WeightedInput, working_dtype
from cfmlang.ops.registry import Gradient, Params, register


@register
class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the inputs (model soup)"

    class Options(Params):
        normalize: bool = True

    Input = WeightedInput

    @staticmethod
    def merge(tensors, base, weights, options, context):
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
    base = "required"

    class Options(Params):
        normalize: bool = False
        lambda_: Gradient = Field(1.0, alias="lambda")

    Input = WeightedInput

    @staticmethod
    def merge(tensors, base, weights, options, context):
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
