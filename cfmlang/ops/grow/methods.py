"""The grow methods: add capacity to a model, in depth (block_expand, stack), in FFN
width (widen) or as experts (upcycle, moe). Each registered class binds its parameters
to its plan (check.py) and its provider (providers.py)."""
from __future__ import annotations

from typing import Annotated, Callable, ClassVar, Literal

from pydantic import Field

from cfmlang.compiler.ir import FLOAT_DTYPES
from cfmlang.ops.grow import check, providers
from cfmlang.ops.grow.check import GROW_KEYS
from cfmlang.ops.grow.prompt_gates import GATE_MODES
from cfmlang.ops.registry import Method, Params, register

Verify = Literal["identity", "none"]


class GrowMethod(Method):
    """A grow method: its `Options`, the statement keys it takes besides them (`keys`),
    `plan(checker, decl, body, options)` -> (inputs, output layers, output ArchInfo,
    *extra options) or None after reporting, and `provider(node, providers, seed)`."""

    keyword = "grow"
    keys: ClassVar[tuple[str, ...]] = GROW_KEYS
    plan: ClassVar[Callable]
    provider: ClassVar[Callable]
    working_copies: ClassVar[int] = 2
    """Float32 copies of its largest output tensor the provider holds while computing one
    (the plan's working set): a copy and its cast by default."""


class VerifyOptions(Params):
    """`verify: identity` runs the grown model next to its input at compile time; it is
    the default of the methods that preserve the function."""

    verify: Verify = "identity"
    tolerance: Annotated[float, Field(gt=0)] = 1e-4


@register
class BlockExpand(GrowMethod):
    name = "block_expand"
    plan = staticmethod(check.plan_block_expand)
    provider = staticmethod(providers.depth_provider)
    summary = ("LLaMA Pro: insert copies of blocks with o_proj and down_proj zeroed "
               "(`every: N` layers, or after `positions:`); the function is unchanged")

    class Options(VerifyOptions):
        every: Annotated[int, Field(ge=1)] | None = None
        positions: list[Annotated[int, Field(ge=0)]] | None = None


@register
class Stack(GrowMethod):
    name = "stack"
    plan = staticmethod(check.plan_stack)
    provider = staticmethod(providers.depth_provider)
    keys = check.STACK_KEYS
    summary = ("depth up-scaling: concatenate layer slices of models (mergekit passthrough "
               "slices), with per-slice `scale`")
    class Options(VerifyOptions):
        verify: Verify = "none"
        dtype: Literal[tuple(FLOAT_DTYPES)] | None = None
        """Output dtype; inputs are cast to it before `scale` (mergekit's `dtype`)."""

    Input = check.Slice
    """Shown as the per-input parameters in the method reference."""


@register
class Widen(GrowMethod):
    name = "widen"
    plan = staticmethod(check.plan_widen)
    provider = staticmethod(providers.widen_provider)
    summary = ("Net2Net on the FFN: grow `intermediate_size` with duplicated neurons whose "
               "down_proj columns are split (`init: duplicate`) or new neurons with zero "
               "output weights (`init: zero`)")

    working_copies = 5     # the new neurons and the concatenation in float64, then the float32 cast

    class Options(VerifyOptions):
        intermediate_size: Annotated[int, Field(ge=1)]
        init: Literal["duplicate", "zero"] = "duplicate"


@register
class Upcycle(GrowMethod):
    name = "upcycle"
    plan = staticmethod(check.plan_upcycle)
    provider = staticmethod(providers.upcycle_provider)
    summary = ("dense FFN -> `experts` copies of it and a new top-k router (Mixtral format); "
               "top-k weights are renormalised, so the function is unchanged")

    class Options(VerifyOptions):
        experts: Annotated[int, Field(ge=2)]
        top_k: Annotated[int, Field(ge=1)] = 2
        router_std: Annotated[float, Field(ge=0)] = 0.02


@register
class Moe(GrowMethod):
    name = "moe"
    plan = staticmethod(check.plan_moe)
    provider = staticmethod(providers.moe_provider)
    keys = check.MOE_KEYS
    summary = ("mergekit-moe: a Mixtral model whose experts are the FFNs of fine-tunes of `base`, "
               "routers initialised from each expert's prompts (`gate_mode`)")

    working_copies = 3     # an expert's FFN tensor, its perturbation and their sum

    class Options(VerifyOptions):
        verify: Verify = "none"
        gate_mode: Literal[GATE_MODES] = "hidden"
        experts_per_token: Annotated[int, Field(ge=1)] = 2

    Input = check.Expert
