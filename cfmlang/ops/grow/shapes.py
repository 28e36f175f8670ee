"""What grow methods compute, as pure functions shared by the checker (output tensor
names, shapes and config from the input's, before any weight is read) and the providers
(the weights): depth plans (block_expand, stack), widened FFNs, upcycled experts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cfmlang.architectures import ROLES, Architecture
from cfmlang.compiler.ir import FLOAT_DTYPES, LayerSource, TensorSpec
from cfmlang.ops.registry import evaluate

FFN_ROLES = ("ffn.gate", "ffn.up", "ffn.down")
"""A gated FFN's projections: widen and upcycle work on these."""
EXPERT_NAMES = {"ffn.gate": "w1", "ffn.down": "w2", "ffn.up": "w3"}
"""Mixtral's names for the gated FFN projections of one expert (upcycle writes Mixtral)."""
MIXTRAL_FFN = "block_sparse_moe"
"""Where a Mixtral layer keeps its router (`gate`) and `experts`."""


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


EMBEDDINGS = ("embed", "position_embed")


def depth_origins(layers: tuple[LayerSource, ...], specs_of: dict[str, list[TensorSpec]],
                  layout: Architecture) -> dict[str, tuple[TensorSpec, Origin]]:
    """Every output tensor of a depth plan, in output order, with its origin.

    Embeddings come from the first layer's model and the other non-layer tensors (final
    norm, LM head) from the last one's, each with its slice's parameters at t = 0:
    mergekit's rule for passthrough slices. A new block's residual-writing projections
    (attention output, FFN down) are zeroed."""
    first, last = layers[0], layers[-1]
    out: dict[str, tuple[TensorSpec, Origin]] = {}
    outer = [s for s in specs_of[first.model] if _embedding(layout, s.name)]
    for spec in outer:
        out[spec.name] = (spec, _origin(first.model, spec.name, first.params, 0.0))
    by_layer = _layer_specs(specs_of, layout)
    for index, source in enumerate(layers):
        for spec in by_layer[source.model].get(source.layer, []):
            name = layout.renumbered(spec.name, index)
            zero = source.new and layout.writes_residual(spec.name)
            out[name] = (TensorSpec(name, spec.shape, spec.dtype),
                         _origin(source.model, spec.name, source.params, source.t, zero))
    for spec in specs_of[last.model]:
        if layout.layer_of(spec.name) is None and not _embedding(layout, spec.name):
            out[spec.name] = (spec, _origin(last.model, spec.name, last.params, 0.0))
    return out


def _embedding(layout: Architecture, name: str) -> bool:
    return layout.layer_of(name) is None and layout.role_of(name) in EMBEDDINGS


def cast_spec(spec: TensorSpec, dtype: str | None) -> TensorSpec:
    """`spec` in the output dtype `dtype` (a float dtype name; None keeps it); only
    floating-point tensors are cast."""
    if dtype is None or spec.dtype not in FLOAT_DTYPES.values():
        return spec
    return TensorSpec(spec.name, spec.shape, FLOAT_DTYPES[dtype])


def _origin(model: str, name: str, params: tuple, t: float, zero: bool = False) -> Origin:
    scale = dict(params).get("scale")
    return Origin(model, name, zero, None if scale is None else evaluate(scale, name, t))


def _layer_specs(specs_of: dict[str, list[TensorSpec]], layout: Architecture) -> dict[str, dict[int, list[TensorSpec]]]:
    out: dict[str, dict[int, list[TensorSpec]]] = {}
    for model, specs in specs_of.items():
        layers: dict[int, list[TensorSpec]] = out.setdefault(model, {})
        for spec in specs:
            index = layout.layer_of(spec.name)
            if index is not None:
                layers.setdefault(index, []).append(spec)
    return out


def missing_output_projections(specs: list[TensorSpec], layer: int, layout: Architecture) -> list[str]:
    """The residual-writing parts (attention output, FFN down) a layer has no zeroable
    tensor for, described with the family's module names."""
    found = {layout.role_of(s.name) for s in specs if layout.layer_of(s.name) == layer
             and layout.writes_residual(s.name)}
    return [f"{ROLES[role]} (`{layout.member(role) or role}`)" for role in layout.residual_roles()
            if role not in found]


def depth_config(configs: dict[str, dict], layers: tuple[LayerSource, ...], layout: Architecture) -> dict:
    """config.json of a depth plan (the first layer's model's), with the new layer
    count under the family's key (`num_hidden_layers`, `n_layer` ...); per-layer lists
    (`layer_types` ...) follow their layers."""
    key_of_count = layout.keys.num_layers
    out = _with_text(configs[layers[0].model])
    text = out.get("text_config", out)
    text[key_of_count] = len(layers)
    for key in list(text):
        lists = {m: _text(c).get(key) for m, c in configs.items()}
        if key != "architectures" and all(isinstance(v, list) and len(v) == _text(configs[m])[key_of_count]
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

def ffn_part(layout: Architecture, name: str) -> tuple[str, str] | None:
    """(role, `weight` or `bias`) of a gated FFN projection's tensor, None for others."""
    role, layer = layout.role_of(name), layout.layer_of(name)
    if role not in FFN_ROLES:
        return None
    kind = name.rsplit(".", 1)[-1]
    return (role, kind) if name == f"{layout.module(layer, role)}.{kind}" and kind in ("weight", "bias") else None


def widened_spec(spec: TensorSpec, size: int, layout: Architecture) -> TensorSpec:
    """The spec of a tensor after widening the FFN to `size` neurons."""
    part = ffn_part(layout, spec.name)
    if part is None or part == ("ffn.down", "bias"):
        return spec
    if part[0] == "ffn.down":
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
    """One FFN tensor widened. `role` is ffn.gate/ffn.up (rows are neurons) or ffn.down
    (columns are neurons).

    duplicate: new rows copy their source neuron; every copy of a neuron (the original
    included) gets down_proj column / (number of copies), so the sum is unchanged.
    zero: new rows are drawn with the tensor's own spread; their down_proj columns are 0."""
    work = tensor.double() if tensor.is_floating_point() else tensor
    if role != "ffn.down":
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


def widen_config(config: dict, size: int, layout: Architecture) -> dict:
    """The config with the FFN width under the family's key (`intermediate_size`,
    `n_inner`, `ffn_hidden_size` ...)."""
    out = _with_text(config)
    _text(out)[layout.keys.intermediate_size or "intermediate_size"] = size
    return out


# ---- experts: upcycle -----------------------------------------------------------------

def upcycled_specs(specs: list[TensorSpec], experts: int,
                   layout: Architecture) -> dict[str, tuple[TensorSpec, str]]:
    """Output spec -> the input tensor it copies (`""` for a new router), in output order."""
    out: dict[str, tuple[TensorSpec, str]] = {}
    for spec in specs:
        part = ffn_part(layout, spec.name)
        if part is None:
            out[spec.name] = (spec, spec.name)
            continue
        prefix = layout.layer_prefix(layout.layer_of(spec.name)) + MIXTRAL_FFN
        if part[0] == "ffn.gate":
            router = f"{prefix}.gate.weight"
            out[router] = (TensorSpec(router, (experts, spec.shape[1]), spec.dtype), "")
        for expert in range(experts):
            name = f"{prefix}.experts.{expert}.{EXPERT_NAMES[part[0]]}.{part[1]}"
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
