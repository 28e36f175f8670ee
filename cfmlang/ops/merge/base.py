"""What every merge method shares: the method class, the per-tensor context, helpers.

A merge method is a small registered class:

    @register
    class Linear(MergeMethod):
        name = "linear"
        class Options(Params): ...        # node-level options (pydantic, strict)
        Input = WeightedInput             # per-input parameters
        base = "none" | "optional" | "required"
        elementwise = True                # can merge a block of rows on its own
        @staticmethod
        def merge(tensors, base, weights, options, context) -> torch.Tensor: ...

`tensors` are the non-base inputs (in declaration order), `weights` their per-input
parameters and `options` the node options, both with gradients already evaluated for
this tensor's layer. Parameter names, defaults and math follow mergekit 0.1.5.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from cfmlang.ops.registry import Gradient, Method, Params

MERGEKIT_METHODS = (
    "linear slerp nuslerp multislerp karcher task_arithmetic ties dare_ties dare_linear "
    "breadcrumbs breadcrumbs_ties della della_linear model_stock sce nearswap arcee_fusion "
    "ram ramplus_tl passthrough").split()


class MergeError(Exception):
    """A merge that cannot be computed for a tensor. The executor reports it as E080 at
    the merge statement, naming the tensor, with `help` as the hint."""

    def __init__(self, message: str, help: str = ""):
        super().__init__(message)
        self.help = help


@dataclass(frozen=True)
class MergeContext:
    """Where a tensor merge happens: the node, the tensor, and the seed in force."""

    node: str
    tensor_name: str
    seed: int

    def generator(self) -> torch.Generator:
        """A generator seeded from (seed, node, tensor): the same draws in every run and
        whatever order tensors are computed in."""
        key = hashlib.sha256(f"{self.seed}/{self.node}/{self.tensor_name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


class MergeMethod(Method):
    keyword = "merge"
    base: ClassVar[str] = "none"
    """Whether the method takes a `base:` model: "none", "optional" or "required"."""
    base_role: ClassVar[str] = "the model the task vectors are taken against"
    """What the `base:` model is to the method (the help of a missing `base:`)."""
    elementwise: ClassVar[bool] = True
    """True when each output element depends only on the same element of the inputs, so
    a tensor can be merged a block of rows at a time."""
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = None
    """How many inputs besides the base the method takes (checked before any weight is read)."""
    Input: ClassVar[type[Params]]

    @staticmethod
    def merge(tensors: list[torch.Tensor], base: torch.Tensor | None, weights: list[dict],
              options: dict, context: MergeContext) -> torch.Tensor:
        raise NotImplementedError


def input_count_problem(method: type[MergeMethod], count: int) -> str | None:
    """Why `count` inputs (besides the base) do not suit `method`, or None when they do."""
    low, high = method.min_inputs, method.max_inputs
    if low <= count and (high is None or count <= high):
        return None
    wanted = (f"exactly {low}" if low == high else f"at least {low}" if high is None
              else f"{low} to {high}")
    plural = "" if wanted.endswith(" 1") else "s"
    besides = " besides the base" if method.base != "none" else ""
    return f"merge method `{method.name}` takes {wanted} input{plural}{besides}, got {count}"


def working_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class WeightedInput(Params):
    weight: Gradient
