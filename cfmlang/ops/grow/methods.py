"""Grow methods: add capacity to a model, in depth (block_expand, stack), in FFN width
(widen) or as experts (upcycle, moe).

Everything here is pure and shared by the checker (output tensor names, shapes and
config from the input's, before any weight is read) and the executor (the weights).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from cfmlang.ops.grow.prompt_gates import GATE_MODES
from cfmlang.compiler.ir import FLOAT_DTYPES, LayerSource, TensorSpec, layer_index, renumbered
from cfmlang.ops.registry import Gradient, Method, Params, evaluate, register

Verify = Literal["identity", "none"]
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "w2")
"""Modules that write into the residual stream: zeroed, a copied block adds nothing."""
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
"""Mixtral's names for the Llama MLP projections of one expert."""


class GrowMethod(Method):
    keyword = "grow"


class VerifyOptions(Params):
    """`verify: identity` runs the grown model next to its input at compile time; it is
    the default of the methods that preserve the function."""

    verify: Verify = "identity"
    tolerance: Annotated[float, Field(gt=0)] = 1e-4


@register
class BlockExpand(GrowMethod):
    name = "block_expand"
    summary = ("LLaMA Pro: insert copies of blocks with o_proj and down_proj zeroed "
               "(`every: N` layers, or after `positions:`); the function is unchanged")

    class Options(VerifyOptions):
        every: Annotated[int, Field(ge=1)] | None = None
        positions: list[Annotated[int, Field(ge=0)]] | None = None


@register
class Stack(GrowMethod):
    name = "stack"
    summary = ("depth up-scaling: concatenate layer slices of models (mergekit passthrough "
               "slices), with per-slice `scale`")
    class Options(VerifyOptions):
        verify: Verify = "none"
        dtype: Literal[tuple(FLOAT_DTYPES)] | None = None
        """Output dtype; inputs are cast to it before `scale` (mergekit's `dtype`)."""

    class Slice(Params):
        """Per-slice parameters, mergekit's passthrough parameters."""

        scale: Gradient | None = None

    Input = Slice
    """Shown as the per-input parameters in the method reference."""


@register
class Widen(GrowMethod):
    name = "widen"
    summary = ("Net2Net on the FFN: grow `intermediate_size` with duplicated neurons whose "
               "down_proj columns are split (`init: duplicate`) or new neurons with zero "
               "output weights (`init: zero`)")

    class Options(VerifyOptions):
        intermediate_size: Annotated[int, Field(ge=1)]
        init: Literal["duplicate", "zero"] = "duplicate"


@register
class Upcycle(GrowMethod):
    name = "upcycle"
    summary = ("dense FFN -> `experts` copies of it and a new top-k router (Mixtral format); "
               "top-k weights are renormalised, so the function is unchanged")

    class Options(VerifyOptions):
        experts: Annotated[int, Field(ge=2)]
        top_k: Annotated[int, Field(ge=1)] = 2
        router_std: Annotated[float, Field(ge=0)] = 0.02


@register
class Moe(GrowMethod):
    name = "moe"
    summary = ("mergekit-moe: a Mixtral model whose experts are the FFNs of fine-tunes of `base`, "
               "routers initialised from each expert's prompts (`gate_mode`)")

    class Options(VerifyOptions):
        verify: Verify = "none"
        gate_mode: Literal[GATE_MODES] = "hidden"
        experts_per_token: Annotated[int, Field(ge=1)] = 2

    class Expert(Params):
        """Per-expert parameters, mergekit-moe's names."""

        positive_prompts: list[str] = []
        negative_prompts: list[str] = []
        noise_scale: Annotated[float, Field(ge=0)] | None = None
        residual_scale: float | None = None

    Input = Expert


# ---- depth: block_expand and stack ---------------------------------------------------

def expanded_layers(model: str, num_layers: int, positions: list[int]) -> tuple[LayerSource, ...]:
    """The original layers with a new copy of layer p after each p in `positions`."""
    out: list[LayerSource] = []
    for layer in range(num_layers):
        out.append(LayerSource(model, layer, False))
        out += [LayerSource(model, layer, True)] * positions.count(layer)
    return tuple(out)


def every_positions(num_layers: int, every: int) -> list[int]:
    """LLaMA Pro's groups: a copy after the last layer of each group of `every` layers."""
    return list(range(every - 1, num_layers, every))


def sliced_layers(model: str, start: int, stop: int, params: tuple) -> tuple[LayerSource, ...]:
    """A stack slice; `t` runs 0..1 over the slice (1 for a single layer), as in mergekit."""
    count = stop - start
    return tuple(LayerSource(model, layer, False, params, (i / (count - 1)) if count > 1 else 1.0)
                 for i, layer in enumerate(range(start, stop)))


@dataclass(frozen=True)
class Origin:
    """Where one output tensor of a depth plan comes from and what is done to it."""

    model: str
    name: str
    zero: bool = False
    scale: Any = None


def depth_origins(layers: tuple[LayerSource, ...],
                  specs_of: dict[str, list[TensorSpec]]) -> dict[str, tuple[TensorSpec, Origin]]:
    """Every output tensor of a depth plan, in output order, with its origin.

    Embeddings come from the first layer's model and the other non-layer tensors (final
    norm, LM head) from the last one's, each with its slice's parameters at t = 0:
    mergekit's rule for passthrough slices."""
    first, last = layers[0], layers[-1]
    out: dict[str, tuple[TensorSpec, Origin]] = {}
    outer = [s for s in specs_of[first.model] if layer_index(s.name) is None and "embed" in s.name]
    for spec in outer:
        out[spec.name] = (spec, _origin(first.model, spec.name, first.params, 0.0))
    by_layer = _layer_specs(specs_of)
    for index, source in enumerate(layers):
        for spec in by_layer[source.model].get(source.layer, []):
            name = renumbered(spec.name, index)
            zero = source.new and _module(spec.name) in OUTPUT_PROJECTIONS
            out[name] = (TensorSpec(name, spec.shape, spec.dtype),
                         _origin(source.model, spec.name, source.params, source.t, zero))
    for spec in specs_of[last.model]:
        if layer_index(spec.name) is None and "embed" not in spec.name:
            out[spec.name] = (spec, _origin(last.model, spec.name, last.params, 0.0))
    return out


def cast_spec(spec: TensorSpec, dtype: str | None) -> TensorSpec:
    """`spec` in the output dtype `dtype` (a float dtype name; None keeps it); only
    floating-point tensors are cast."""
    if dtype is None or spec.dtype not in FLOAT_DTYPES.values():
        return spec
    return TensorSpec(spec.name, spec.shape, FLOAT_DTYPES[dtype])


def _origin(model: str, name: str, params: tuple, t: float, zero: bool = False) -> Origin:
    scale = dict(params).get("scale")
    return Origin(model, name, zero, None if scale is None else evaluate(scale, name, t))


def _layer_specs(specs_of: dict[str, list[TensorSpec]]) -> dict[str, dict[int, list[TensorSpec]]]:
    out: dict[str, dict[int, list[TensorSpec]]] = {}
    for model, specs in specs_of.items():
        layers: dict[int, list[TensorSpec]] = out.setdefault(model, {})
        for spec in specs:
            index = layer_index(spec.name)
            if index is not None:
                layers.setdefault(index, []).append(spec)
    return out


def _module(tensor_name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `down_proj`."""
    parts = tensor_name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def missing_output_projections(specs: list[TensorSpec], layer: int) -> list[str]:
    """The residual-writing kinds (attention, MLP) a layer has no zeroable tensor for."""
    modules = {_module(s.name) for s in specs if layer_index(s.name) == layer}
    wanted = {"attention output (o_proj)": {"o_proj"}, "MLP output (down_proj)": {"down_proj", "w2"}}
    return [what for what, names in wanted.items() if not modules & names]


def depth_config(configs: dict[str, dict], layers: tuple[LayerSource, ...]) -> dict:
    """config.json of a depth plan (the first layer's model's), with the new layer
    count; per-layer lists (`layer_types` ...) follow their layers."""
    out = _with_text(configs[layers[0].model])
    text = out.get("text_config", out)
    text["num_hidden_layers"] = len(layers)
    for key in list(text):
        lists = {m: _text(c).get(key) for m, c in configs.items()}
        if key != "architectures" and all(isinstance(v, list) and len(v) == _text(configs[m])["num_hidden_layers"]
                                          for m, v in lists.items()):
            text[key] = [lists[s.model][s.layer] for s in layers]
    return out


def _text(config: dict) -> dict:
    """The part of a config.json that describes the decoder (`text_config` when nested)."""
    return config.get("text_config", config)


def _with_text(config: dict) -> dict:
    """A copy of a config whose decoder part may be changed without touching the original."""
    out = dict(config)
    if "text_config" in out:
        out["text_config"] = dict(out["text_config"])
    return out


# ---- width: widen ---------------------------------------------------------------------

MLP_RE = re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")


def widened_spec(spec: TensorSpec, size: int) -> TensorSpec:
    """The spec of a tensor after widening the FFN to `size` neurons."""
    match = MLP_RE.search(spec.name)
    if match is None or (match.group(1) == "down_proj" and match.group(2) == "bias"):
        return spec
    if match.group(1) == "down_proj":
        return TensorSpec(spec.name, spec.shape[:-1] + (size,), spec.dtype)
    return TensorSpec(spec.name, (size,) + spec.shape[1:], spec.dtype)


def neuron_sources(current: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """For each of the `size - current` new neurons, the old neuron it copies: a random
    permutation of the old ones, repeated when more are added than exist (Net2Net)."""
    added = size - current
    rounds = -(-added // current)
    return torch.cat([torch.randperm(current, generator=generator) for _ in range(rounds)])[:added]


def widen_tensor(tensor: torch.Tensor, role: str, sources: torch.Tensor, init: str,
                 generator: torch.Generator) -> torch.Tensor:
    """One MLP tensor widened. `role` is gate_proj/up_proj (rows are neurons) or
    down_proj (columns are neurons).

    duplicate: new rows copy their source neuron; every copy of a neuron (the original
    included) gets down_proj column / (number of copies), so the sum is unchanged.
    zero: new rows are drawn with the tensor's own spread; their down_proj columns are 0."""
    work = tensor.double() if tensor.is_floating_point() else tensor
    if role != "down_proj":
        if init == "duplicate":
            new = work[sources]
        else:
            spread = work.std() if work.numel() > 1 else torch.tensor(0.0, dtype=work.dtype)
            new = torch.randn((len(sources),) + tuple(work.shape[1:]), generator=generator,
                              dtype=work.dtype) * spread
        return torch.cat([work, new]).to(tensor.dtype)
    if init == "zero":
        zeros = work.new_zeros(work.shape[:-1] + (len(sources),))
        return torch.cat([work, zeros], dim=-1).to(tensor.dtype)
    copies = torch.bincount(sources, minlength=work.shape[-1]).to(work.dtype) + 1
    split = work / copies
    return torch.cat([split, split[..., sources]], dim=-1).to(tensor.dtype)


def widen_config(config: dict, size: int) -> dict:
    out = _with_text(config)
    _text(out)["intermediate_size"] = size
    return out


# ---- experts: upcycle -----------------------------------------------------------------

def moe_prefix(tensor_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `model.layers.3.block_sparse_moe`."""
    return tensor_name.split(".mlp.")[0] + ".block_sparse_moe"


def upcycled_specs(specs: list[TensorSpec], experts: int) -> dict[str, tuple[TensorSpec, str]]:
    """Output spec -> the input tensor it copies (`""` for a new router), in output order."""
    out: dict[str, tuple[TensorSpec, str]] = {}
    for spec in specs:
        match = MLP_RE.search(spec.name)
        if match is None:
            out[spec.name] = (spec, spec.name)
            continue
        prefix = moe_prefix(spec.name)
        if match.group(1) == "gate_proj":
            router = f"{prefix}.gate.weight"
            out[router] = (TensorSpec(router, (experts, spec.shape[1]), spec.dtype), "")
        for expert in range(experts):
            name = f"{prefix}.experts.{expert}.{EXPERT_NAMES[match.group(1)]}.{match.group(2)}"
            out[name] = (TensorSpec(name, spec.shape, spec.dtype), spec.name)
    return out


def router_weight(spec: TensorSpec, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(spec.shape, generator=generator, dtype=torch.float64) * std


MIXTRAL_DROPPED = ("mlp_bias", "attention_bias", "pretraining_tp", "auto_map")


def upcycle_config(config: dict, experts: int, top_k: int) -> dict:
    """A Mixtral config.json for the upcycled model: same attention and sizes, every
    layer's FFN replaced by `experts` experts, `top_k` of them routed per token."""
    out = {k: v for k, v in config.items() if k not in MIXTRAL_DROPPED}
    out.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
               num_local_experts=experts, num_experts_per_tok=top_k,
               output_router_logits=False, router_jitter_noise=0.0)
    out.setdefault("sliding_window", None)
    return out
