"""`update` method `alphaedit`: sequential knowledge edits whose weight changes are
projected onto the null space of the preserved knowledge's keys (Fang et al.,
"AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", ICLR 2025).

With W a down projection ([hidden, ffn], W k = v), K0 the keys of preserved knowledge
and P the projection onto the eigenvectors of K0 K0^T whose eigenvalues are small (the
approximate null space of K0^T: here the smallest ones that together hold at most
`nullspace_energy` of the trace; the paper thresholds each eigenvalue at an absolute
2e-2, which depends on the model's key scale), a change D P leaves W k0 unchanged for every preserved
key: (W + D P) k0 = W k0 + D (P k0) ~ W k0. Each edit (a batch of `batch_size` facts)
solves, layer by layer as MEMIT does, for D P minimising

    |(W + D P) K - V|^2 + |D P|^2 alpha + |D P Kp|^2,

K, V the batch's keys and wanted values, Kp the keys of the earlier batches of the same
update (kept so that later edits do not undo them). Transposed, the solution is

    X = (P (K K^T + Kp Kp^T) + alpha I)^-1 P K R^T,        W += X^T,

R the batch's remaining residual error shared out over the layers still to edit. X lies
in the range of P: the (I - P) part of the system reads alpha (I - P) X = 0.
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from cfmlang.ops.registry import register
from cfmlang.ops.update.editing import (EditError, Log, Request, averaged_keys, down_proj, key_second_moments, optimise_value,
                                        residual_after)
from cfmlang.ops.update.knowledge import (EditMethod, EditOptions, EditOutcome, Memit, statistics_tokens,
                                          value_search, weight_name)


@register
class AlphaEdit(EditMethod):
    name = "alphaedit"
    summary = "sequential edits projected onto the null space of preserved keys (AlphaEdit)"

    layer_key = "layers"

    class Options(EditOptions):
        layers: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
        batch_size: Annotated[int, Field(ge=1, le=10000)] = 1            # facts per sequential edit
        nullspace_energy: Annotated[float, Field(gt=0, lt=1)] = 0.02     # share of the keys' trace
        l2: Annotated[float, Field(ge=0)] = 10.0                         # alpha, x the mean key eigenvalue

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        return Memit.default_layers(num_layers)


def null_space(moment: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """P = U U^T over the eigenvectors of `moment` of smallest eigenvalues that together
    hold at most `energy` of its trace (the share of the preserved keys' second moment an
    edit may touch), and their number."""
    values, vectors = torch.linalg.eigh(moment)          # ascending
    held = torch.cumsum(values.clamp(min=0), 0) / values.clamp(min=0).sum()
    kept = vectors[:, held <= energy]
    return kept @ kept.T, kept.shape[1]


def alphaedit(model, tokenizer, requests: list[Request], options: dict, seed: int, log: Log) -> EditOutcome:
    """The facts in batches of `batch_size`, each batch a null-space constrained MEMIT edit
    of the model the earlier batches left (their keys kept in Kp)."""
    if options["covariance"] == "identity":
        raise EditError("alphaedit needs measured key statistics: the identity has no null space",
                        "use `covariance: text` or `covariance: sampled`")
    layers = sorted(set(options["layers"]))
    last, prefixes, size = layers[-1], tuple(options["prefixes"]), options["batch_size"]
    tokens = statistics_tokens(model, tokenizer, options, seed, log)
    moments = key_second_moments(model, layers, tokens)
    projections, alphas, earlier = {}, {}, {}
    for layer in layers:
        moment = moments[layer].moment
        projections[layer], dimension = null_space(moment, options["nullspace_energy"])
        alphas[layer] = options["l2"] * float(moment.diagonal().mean())
        earlier[layer] = torch.zeros_like(moment)
        log(f"  alphaedit layer {layer}: null space of {dimension} of {len(moment)} key directions")
    reached = []
    for start in range(0, len(requests), size):
        batch = requests[start:start + size]
        log(f"  alphaedit edit {start // size + 1}/{-(-len(requests) // size)}: facts {start + 1} to "
            f"{start + len(batch)} (layers {layers[0]}-{last})")
        values = []
        for request in batch:
            result = optimise_value(model, tokenizer, last, request, prefixes, value_search(options), log)
            values.append(result.delta)
            reached.append(result.target_probability)
        goals = residual_after(model, tokenizer, last, batch) + torch.stack(values)
        for index, layer in enumerate(layers):
            keys = averaged_keys(model, tokenizer, layer, batch, prefixes).T              # [ffn, n]
            remaining = (goals - residual_after(model, tokenizer, last, batch)).T         # [hidden, n]
            projection = projections[layer]
            system = projection @ (keys @ keys.T + earlier[layer]) + alphas[layer] * torch.eye(len(keys),
                                                                                              dtype=keys.dtype)
            update = torch.linalg.solve(system, projection @ keys @ (remaining / (len(layers) - index)).T)
            weight = down_proj(model, layer).weight
            with torch.no_grad():
                weight.add_(update.T.to(weight.dtype))
        for layer in layers:
            keys = averaged_keys(model, tokenizer, layer, batch, prefixes).T
            earlier[layer] += keys @ keys.T
    return EditOutcome({weight_name(model, layer): down_proj(model, layer).weight.detach().clone()
                        for layer in layers}, reached)


AlphaEdit.edit = staticmethod(alphaedit)
