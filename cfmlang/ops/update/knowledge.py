"""Knowledge edits: `update` methods `rome` (one rank-one change of one FFN down
projection per fact) and `memit` (a batch of facts spread over several layers);
`alphaedit` (alphaedit.py) builds on them.

Both run on a model held in memory and return the changed weights only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, ClassVar, Literal

import torch
from pydantic import Field

from cfmlang.architectures import describe
from cfmlang.io.text import sampled_tokens, shipped_windows
from cfmlang.ops.update.editing import (Log, Request, ValueSearch, averaged_keys, down_proj, key_second_moments,
                                        optimise_value, residual_after)
from cfmlang.ops.registry import Method, Params, register

DEFAULT_PREFIXES = ("", "Here is a fact. ", "I learned this today. ", "As everyone knows, ",
                    "Quick question. ")
"""Contexts written before a prompt: keys are averaged over them, and the value must
produce the target after each (ROME samples such prefixes from the model; fixed ones
keep compiles hermetic)."""


class EditOptions(Params):
    """Options shared by `rome` and `memit` (ROME's hyperparameter names in brackets)."""

    steps: Annotated[int, Field(ge=1, le=1000)] = 20                  # v_num_grad_steps
    lr: Annotated[float, Field(gt=0)] = 0.5                            # v_lr
    kl_factor: Annotated[float, Field(ge=0)] = 0.0625
    weight_decay: Annotated[float, Field(ge=0)] = 0.5                  # v_weight_decay
    clamp_norm: Annotated[float, Field(gt=0)] = 4.0                    # clamp_norm_factor (ROME's)
    prefixes: Annotated[list[str], Field(min_length=1)] = list(DEFAULT_PREFIXES)
    covariance: Literal["text", "sampled", "identity"] = "text"
    calibration_texts: Annotated[int, Field(ge=1, le=4096)] = 64
    calibration_tokens: Annotated[int, Field(ge=4, le=1024)] = 64
    report_tokens: Annotated[int, Field(ge=1, le=256)] = 8


def value_search(options: dict) -> ValueSearch:
    return ValueSearch(options["steps"], options["lr"], options["kl_factor"], options["weight_decay"],
                       options["clamp_norm"])


class EditMethod(Method):
    keyword = "update"
    layer_key: ClassVar[str]
    edit: ClassVar[Callable[..., "EditOutcome"]]

    @staticmethod
    def default_layers(num_layers: int):
        """The layers edited when the program names none (scaled to the model's depth)."""
        raise NotImplementedError


@register
class Rome(EditMethod):
    name = "rome"
    summary = "rank-one edit of one FFN down projection per fact (ROME)"

    layer_key = "layer"

    class Options(EditOptions):
        layer: Annotated[int, Field(ge=0)] | None = None

    @staticmethod
    def default_layers(num_layers: int) -> int:
        return round(0.15 * (num_layers - 1))


@register
class Memit(EditMethod):
    name = "memit"
    summary = "a batch of facts written over several FFN down projections at once (MEMIT)"

    layer_key = "layers"

    class Options(EditOptions):
        layers: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
        covariance_weight: Annotated[float, Field(gt=0)] | None = None  # mom2_update_weight (None: scaled)

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        last = Rome.default_layers(num_layers)
        return list(range(max(0, last - 4), last + 1))


WEIGHT_PER_NEURON = 15000 / 16384
"""MEMIT's covariance weight for GPT-J (15000 at an FFN width of 16384) per FFN neuron. A
layer writes about m / (weight + m) of a fact's remaining error, m = k^T C^-1 k, and m
grows with the FFN width (its mean over the calibration keys is the width), so the weight
that strikes GPT-J's balance between the edit and the preserved keys scales with it."""


def covariance_weight(options: dict, ffn: int) -> float:
    return options["covariance_weight"] or WEIGHT_PER_NEURON * ffn


@dataclass(frozen=True)
class EditOutcome:
    """The new weights (float32, by tensor name) and what the optimisation reached."""

    weights: dict[str, torch.Tensor]
    target_probability: list[float]


def statistics_tokens(model, tokenizer, options: dict, seed: int, log: Log) -> torch.Tensor:
    """The token rows key statistics are measured on (`covariance: text` or `sampled`)."""
    if options["covariance"] == "text":
        tokens = shipped_windows(tokenizer)
        log(f"  key statistics: {tokens.numel()} tokens of the shipped text")
        return tokens
    log(f"  key statistics: sampling {options['calibration_texts']} texts of "
        f"{options['calibration_tokens']} tokens from the model")
    return sampled_tokens(model, tokenizer, options["calibration_texts"], options["calibration_tokens"], seed)


def second_moments(model, tokenizer, layers: list[int], options: dict, seed: int, log: Log) -> dict | None:
    """Shrunk key second moments per layer, or None for `covariance: identity`."""
    if options["covariance"] == "identity":
        return None
    tokens = statistics_tokens(model, tokenizer, options, seed, log)
    return {layer: moments.shrunk() for layer, moments in key_second_moments(model, layers, tokens).items()}


def weight_name(model, layer: int) -> str:
    """The checkpoint name of a layer's FFN down projection weight."""
    return describe(model.config.to_dict()).module(layer, "ffn.down") + ".weight"


def rome(model, tokenizer, requests: list[Request], options: dict, seed: int, log: Log) -> EditOutcome:
    """One rank-one update per fact, applied in order (each sees the previous ones):
    u = C^-1 k* / |C^-1 k*| with k* the subject key averaged over the prefixes; the
    right vector makes the bare prompt's key map to the optimised value exactly."""
    moments = second_moments(model, tokenizer, [options["layer"]], options, seed, log)
    return rome_with(model, tokenizer, requests, options, moments, log)


def rome_with(model, tokenizer, requests: list[Request], options: dict, moments: dict | None,
              log: Log) -> EditOutcome:
    """ROME with key statistics already measured (`second_moments`)."""
    layer = options["layer"]
    weight = down_proj(model, layer).weight
    reached = []
    for number, request in enumerate(requests, start=1):
        log(f"  rome fact {number}/{len(requests)}: {request.prompt!r} -> {request.target!r} (layer {layer})")
        key = averaged_keys(model, tokenizer, layer, [request], tuple(options["prefixes"]))[0]
        direction = key if moments is None else torch.linalg.solve(moments[layer], key)
        direction = direction / direction.norm()
        value = optimise_value(model, tokenizer, layer, request, tuple(options["prefixes"]),
                               value_search(options), log)
        bare_key = averaged_keys(model, tokenizer, layer, [request], ("",))[0]
        right = value.delta / torch.dot(bare_key, direction)
        with torch.no_grad():
            weight.add_(torch.outer(right, direction).to(weight.dtype))
        reached.append(value.target_probability)
    return EditOutcome({weight_name(model, layer): weight.detach().clone()}, reached)


def memit(model, tokenizer, requests: list[Request], options: dict, seed: int, log: Log) -> EditOutcome:
    """MEMIT: optimise each fact's residual-stream value at the last edited layer, then
    for each layer l (in order) solve (lambda C_l + K K^T) A = K and add R A^T, where R is
    the remaining residual error shared out over the layers still to edit."""
    layers = sorted(set(options["layers"]))
    last, prefixes = layers[-1], tuple(options["prefixes"])
    moments = second_moments(model, tokenizer, layers, options, seed, log)
    weight_of_moment = covariance_weight(options, down_proj(model, last).in_features)
    log(f"  memit covariance weight {weight_of_moment:g}")
    values, reached = [], []
    for number, request in enumerate(requests, start=1):
        log(f"  memit value {number}/{len(requests)}: {request.prompt!r} -> {request.target!r} (layer {last})")
        result = optimise_value(model, tokenizer, last, request, prefixes, value_search(options), log)
        values.append(result.delta)
        reached.append(result.target_probability)
    goals = residual_after(model, tokenizer, last, requests) + torch.stack(values)
    for index, layer in enumerate(layers):
        keys = averaged_keys(model, tokenizer, layer, requests, prefixes).T           # [ffn, n]
        remaining = (goals - residual_after(model, tokenizer, last, requests)).T      # [hidden, n]
        moment = torch.eye(len(keys), dtype=keys.dtype) if moments is None else moments[layer]
        adjusted = torch.linalg.solve(weight_of_moment * moment + keys @ keys.T, keys)
        update = (remaining / (len(layers) - index)) @ adjusted.T
        weight = down_proj(model, layer).weight
        with torch.no_grad():
            weight.add_(update.to(weight.dtype))
        log(f"  memit layer {layer}: residual {remaining.norm(dim=0).mean():.3f}, "
            f"update norm {update.norm():.3f} of weight norm {weight.norm():.3f}")
    return EditOutcome({weight_name(model, layer): down_proj(model, layer).weight.detach().clone()
                        for layer in layers}, reached)


Rome.edit = staticmethod(rome)
Memit.edit = staticmethod(memit)
