"""FFN neuron activations of a transformers model, read and edited through hooks.

A neuron's activation is an entry of a = act(gate(x)) * up(x), the input of the FFN's
down projection; forward pre-hooks on every layer's down projection observe or replace it.
The model itself runs unchanged (no reimplementation of any architecture)."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cfmlang.analysis.probes import Probes
from cfmlang.analysis.shards import LOCAL, Shards
from cfmlang.architectures import ArchitectureError, layer_module, of_model
from cfmlang.diagnostics import CompileError, error

Edit = Callable[[int, torch.Tensor], torch.Tensor]
"""(layer index, activations [batch, tokens, neurons]) -> the activations to use."""


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor        # [batch, tokens], right-padded
    attention_mask: torch.Tensor   # [batch, tokens], 1 on real tokens
    indices: tuple[int, ...]       # positions of these sequences in the Probes


def ffn_sites(model: nn.Module) -> list[nn.Linear]:
    """The down projection of each layer's gated FFN, in layer order."""
    try:
        layout = of_model(model)
    except ArchitectureError as exc:
        raise CompileError([exc.diagnostic()]) from None
    if not layout.gated_ffn:
        raise CompileError([error("E161", f"{type(model).__name__} has no gated FFN (separate gate, up and "
                                  f"down projections; {layout.model_type} layers hold "
                                  f"{', '.join(role for role, _ in layout.members)})", None,
                                  "cfmc analyze supports decoder models whose FFN computes "
                                  "down(act(gate(x)) * up(x)), as Llama, Mistral and Qwen2 do")])
    return [layer_module(model, layer, "ffn.down") for layer in range(layout.num_layers)]


def down_weights(model: nn.Module) -> list[torch.Tensor]:
    """W_down of each layer, [hidden, neurons]."""
    return [site.weight.detach() for site in ffn_sites(model)]


def batches(probes: Probes, max_tokens: int) -> Iterator[Batch]:
    """Sequences grouped by length, each batch holding at most `max_tokens` padded tokens
    (padding holds token 0; it is masked out of attention and of every statistic)."""
    order = sorted(range(len(probes.sequences)), key=lambda i: (len(probes.sequences[i]), i))
    group: list[int] = []
    for index in order:
        width = len(probes.sequences[index])
        if group and (len(group) + 1) * width > max_tokens:
            yield _pad(probes, group)
            group = []
        group.append(index)
    if group:
        yield _pad(probes, group)


def _pad(probes: Probes, group: list[int]) -> Batch:
    width = max(len(probes.sequences[i]) for i in group)
    ids = torch.zeros((len(group), width), dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, index in enumerate(group):
        sequence = probes.sequences[index]
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    return Batch(ids, mask, tuple(group))


@contextlib.contextmanager
def edited_ffns(model: nn.Module, edit: Edit | None):
    """Within the block every FFN's activations pass through `edit` (None: untouched)."""
    if edit is None:
        yield
        return
    handles = [site.register_forward_pre_hook(_pre_hook(layer, edit))
               for layer, site in enumerate(ffn_sites(model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(layer: int, edit: Edit):
    def hook(module, args):
        return (edit(layer, args[0]),) + tuple(args[1:])
    return hook


def sequence_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of each sequence and its token count."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.input_ids[:, 1:]
    scored = batch.attention_mask[:, 1:].to(logits.dtype)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                                            reduction="none")
    return (nll * scored).sum(1).double(), scored.sum(1).double()


def probe_nll(model: nn.Module, probes: Probes, edit: Edit | None = None, *,
              max_batch_tokens: int = 2048, tick=lambda: None,
              shards: Shards = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL and predicted-token counts over `probes`, FFNs edited by `edit`."""
    total = torch.zeros(len(probes.sequences), dtype=torch.float64)
    counts = torch.zeros_like(total)
    grouped = list(batches(probes, max_batch_tokens))
    for batch, (nll, count) in zip(grouped, shards.map(model, functools.partial(batch_nll, edit), grouped, tick)):
        index = torch.tensor(batch.indices)
        total[index], counts[index] = nll, count
    return total, counts


def batch_nll(edit: Edit | None, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(), edited_ffns(model, edit):
        return sequence_nll(model, batch)


def instance_activations(model: nn.Module, probes: Probes, *, max_batch_tokens: int = 2048,
                         tick=lambda: None, shards: Shards = LOCAL) -> torch.Tensor:
    """A[i, layer, n]: the mean over the tokens of prompt i of |a_n| (float32)."""
    result = torch.zeros(len(probes.sequences), len(ffn_sites(model)), ffn_sites(model)[0].in_features)
    grouped = list(batches(probes, max_batch_tokens))
    for batch, part in zip(grouped, shards.map(model, batch_activations, grouped, tick)):
        result[torch.tensor(batch.indices)] = part
    return result


def batch_activations(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[sequences of the batch, layer, n]: the mean over each sequence's tokens of |a_n|."""
    result = torch.zeros(len(batch.indices), len(ffn_sites(model)), ffn_sites(model)[0].in_features)
    mask = batch.attention_mask.float()

    def observe(layer: int, a: torch.Tensor) -> torch.Tensor:
        result[:, layer] = (a.abs().float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return a

    with torch.inference_mode(), edited_ffns(model, observe):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return result


def token_activations(model: nn.Module, probes: Probes, *, max_batch_tokens: int = 2048,
                      tick=lambda: None, shards: Shards = LOCAL) -> list[torch.Tensor]:
    """Per layer, the activations of every real (unpadded) token of `probes`, [tokens, neurons]."""
    grouped = list(batches(probes, max_batch_tokens))
    parts = shards.map(model, batch_token_activations, grouped, tick)
    return [torch.cat([part[layer] for part in parts]) for layer in range(len(ffn_sites(model)))]


def batch_token_activations(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """Per layer, the activations of the batch's real tokens, [tokens, neurons]."""
    per_layer: list[torch.Tensor] = [torch.empty(0)] * len(ffn_sites(model))
    mask = batch.attention_mask.bool()

    def observe(layer: int, a: torch.Tensor) -> torch.Tensor:
        per_layer[layer] = a[mask].float()
        return a

    with torch.inference_mode(), edited_ffns(model, observe):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return per_layer


def batch_count(probes: Probes, max_batch_tokens: int) -> int:
    return sum(1 for _ in batches(probes, max_batch_tokens))
