"""A module outside cfmlang that adds, through the public registries only, a merge
method, a grow method, an update method and a router for top-k routes. Importing it
registers them; tests/compiler/test_extending.py compiles programs that use them."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from cfmlang.compiler.ir import LayerSource
from cfmlang.ops.experts.routers import register_router
from cfmlang.ops.grow.check import depth_arch
from cfmlang.ops.grow.methods import GrowMethod, VerifyOptions
from cfmlang.ops.grow.providers import depth_provider
from cfmlang.ops.merge.base import MergeMethod
from cfmlang.ops.registry import Params, register
from cfmlang.ops.update.editing import down_proj
from cfmlang.ops.update.knowledge import EditMethod, EditOptions, EditOutcome, weight_name


class NoInput(Params):
    pass


@register
class ScaledMean(MergeMethod):
    name = "scaled_mean"
    summary = "base + scale * the mean of the inputs' task vectors"
    base = "required"
    Input = NoInput

    class Options(Params):
        scale: Annotated[float, Field(ge=0, le=2)] = 1.0

    @staticmethod
    def merge(tensors, base, weights, options, context):
        vectors = torch.stack([t.double() - base.double() for t in tensors])
        return (base.double() + options["scale"] * vectors.mean(0)).to(base.dtype)


def plan_repeat_last(checker, decl, body, options):
    """The input's layers, then `copies` more copies of its last layer."""
    source = checker.required_model_ref(body, "from", f"`grow {decl.name}` needs `from:`", decl.name_span,
                                        "name the model to grow", "model to grow")
    if source is None or checker.layout_of(source, "repeat_last", decl.name_span) is None:
        return None
    arch = checker.nodes[source].arch
    layers = tuple(LayerSource(source, i, False) for i in range(arch.num_layers))
    layers += (LayerSource(source, arch.num_layers - 1, False),) * options["copies"]
    return (source,), layers, depth_arch(arch, layers, {source: list(arch.tensors)})


@register
class RepeatLast(GrowMethod):
    name = "repeat_last"
    summary = "append copies of the last layer"
    plan = staticmethod(plan_repeat_last)
    provider = staticmethod(depth_provider)

    class Options(VerifyOptions):
        verify: Literal["identity", "none"] = "none"
        copies: Annotated[int, Field(ge=1, le=8)] = 1


def shrink(model, tokenizer, requests, options, seed, log) -> EditOutcome:
    """Scale the down projection of `layer` by 1 - `strength` (in place)."""
    layer = options["layer"]
    weight = down_proj(model, layer).weight
    with torch.no_grad():
        weight.mul_(1 - options["strength"])
    return EditOutcome({weight_name(model, layer): weight.detach().clone()}, [0.0] * len(requests))


@register
class Shrink(EditMethod):
    name = "shrink"
    summary = "scale one FFN down projection by 1 - strength"
    layer_key = "layer"
    edit = staticmethod(shrink)

    class Options(EditOptions):
        layer: Annotated[int, Field(ge=0)] | None = None
        strength: Annotated[float, Field(ge=0, le=1)] = 0.5

    @staticmethod
    def default_layers(num_layers: int) -> int:
        return num_layers - 1


class FixedRouter(nn.Module):
    """Scores every token's experts by a fixed preference (the first expert first)."""

    def __init__(self, preference: torch.Tensor):
        super().__init__()
        self.preference = nn.Parameter(preference, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.preference.to(x.dtype).expand(*x.shape[:-1], -1)


def build_first(data):
    """Always the first experts of the layer."""
    experts = data.gate_up.shape[0]
    preference = torch.arange(experts, 0, -1, dtype=torch.float32)
    return {"preference": preference}, FixedRouter(preference)


register_router("first", build_first, lambda tensors, act, count: FixedRouter(tensors["preference"]))
