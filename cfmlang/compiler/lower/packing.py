"""Weight packing: float32 weights that are exact block-quantized values, stored as their codes.

A model converted from a GGUF file (SmolLM2 here) carries float32 weights that are, block
of 32 by block, `d * q + m` (Q4_1) or `d * q` (Q8_0) with float16 `d`,
`m` and small integer `q`. This pass recovers `d`, `m` and `q` from the float32 values and
keeps a linear layer packed only when rebuilding every block from them gives back every
weight bit for bit, so packing never changes a weight. Merged, edited or fine-tuned
weights are not block values; their layers stay float32.

Only the inductor decode program uses packed layers; the prefill program keeps the
float32 layers, whose matrix products are faster over many tokens. A packed layer is
computed one of three ways (`lower.DECODE_KERNELS`, the `--decode-kernel` option):
- `exact`: `PackedLinear`, cfmlang's native kernel rebuilding the float32 weight from the
  codes inside the product: eager's weights bit for bit, float32 sums over all threads;
- `bf16`: `KernelLinear`, torch's weight-only int4 CPU kernel over the codes, bfloat16
  activations and outputs (the block scales rounded to bfloat16);
- `bf16x2`: the same with each input split into two bfloat16 parts (high and low), which
  cuts the logits' error by a third on SmolLM2 for about a fifth more time per product.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from cfmlang.runtime.packed_linear import BLOCK, KernelLinear, PackedLinear
from cfmlang.runtime.packed_routed import PackedRoutedMLP
from cfmlang.runtime.routed_mlp import RoutedMLP

# Rebuilding weights from codes costs arithmetic per row of the batch, reading float32
# weights does not, so from some batch size on the float32 matrix products are faster. On a
# 2-core AVX-512 Xeon the packed SmolLM2 decode step against the float32 program: 2.4x at 8
# rows and 1.5x at 16 with the native kernel's AVX-512 form, 1.8x and 1.15x with its AVX2
# form, 1.9x and 1.3x with the bf16 kernel; even or slower from 32 rows on (`cfmc bench DIR
# --against DIR --batch 8 16 32` with this limit raised in one copy's cfm.json). A dense model
# decodes larger batches with its float32 prefill program; routed models always use their
# gather decode program.
PACKED_DECODE_MAX_BATCH = 16
MAX_PACKED_INPUTS = 65536    # the native kernel's limit on a layer's inputs (kMaxInputs); wider layers stay float32


@dataclass(frozen=True)
class PackingReport:
    """What the decode program reads per token for its linear layers, packed or not."""

    q4_1: int
    q8_0: int
    float32: int
    float32_bytes: int
    packed_bytes: int
    routed: int = 0          # routed FFNs packed (PackedRoutedMLP)
    routed_float32: int = 0  # routed FFNs left as float32 gathers

    def describe(self) -> str:
        text = (f"{self.q4_1 + self.q8_0} of {self.q4_1 + self.q8_0 + self.float32} linear weights are exact "
                f"block values (Q4_1: {self.q4_1}, Q8_0: {self.q8_0}); the decode program reads "
                f"{self.packed_bytes / 1e6:.0f} MB of them per token instead of {self.float32_bytes / 1e6:.0f} MB")
        if self.routed or self.routed_float32:
            text += (f"; {self.routed} of {self.routed + self.routed_float32} routed FFNs packed (their "
                     "chosen experts' Q4_1 rows and columns read per token)")
        return text


def candidate_scales(estimate: torch.Tensor) -> list[torch.Tensor]:
    """The float16 number nearest `estimate` (>= 0) and its two neighbours, as float32."""
    bits = estimate.to(torch.float16).view(torch.int16).to(torch.int32)
    return [(bits + step).clamp(0, 0x7BFF).to(torch.int16).view(torch.float16).to(torch.float32)
            for step in (0, -1, 1)]


def recover(blocks: torch.Tensor, estimate: torch.Tensor, offset: torch.Tensor | None,
            low: int, high: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes in low..high and a float16 scale per block with `scale * q (+ offset) == blocks`
    exactly; None when some block has none."""
    base = blocks if offset is None else blocks - offset[..., None]
    codes = torch.zeros_like(blocks, dtype=torch.int32)
    scales = torch.zeros_like(estimate)
    solved = torch.zeros(estimate.shape, dtype=torch.bool)
    for scale in candidate_scales(estimate):
        trial = torch.where(scale[..., None] > 0, base / scale[..., None], 0).round().clamp(low, high)
        rebuilt = trial * scale[..., None] if offset is None else trial * scale[..., None] + offset[..., None]
        exact = (rebuilt == blocks).all(-1) & ~solved
        codes[exact], scales[exact] = trial[exact].to(torch.int32), scale[exact]
        solved |= exact
    return (codes, scales) if bool(solved.all()) else None


def as_float16(values: torch.Tensor) -> torch.Tensor | None:
    half = values.to(torch.float16)
    return half if torch.equal(half.to(torch.float32), values) else None


def q4_1_layer(weight: torch.Tensor, bias) -> PackedLinear | None:
    rows, inputs = weight.shape
    if inputs % (2 * BLOCK) or inputs > MAX_PACKED_INPUTS:
        return None
    blocks = weight.reshape(rows, inputs // BLOCK, BLOCK)
    offset = blocks.min(-1).values          # the block's minimum is its code 0
    if as_float16(offset) is None:
        return None
    found = recover(blocks, (blocks.max(-1).values - offset) / 15, offset, 0, 15)
    if found is None:
        return None
    codes, scales = found
    codes = codes.reshape(rows, inputs).to(torch.uint8)
    half = inputs // 2
    nibbles = codes[:, :half] | (codes[:, half:] << 4)
    return PackedLinear("q4_1", nibbles.contiguous(), scales.to(torch.float16), offset.to(torch.float16), bias)


def q8_0_layer(weight: torch.Tensor, bias) -> PackedLinear | None:
    rows, inputs = weight.shape
    if inputs % BLOCK or inputs > MAX_PACKED_INPUTS:
        return None
    blocks = weight.reshape(rows, inputs // BLOCK, BLOCK)
    found = recover(blocks, blocks.abs().max(-1).values / 127, None, -128, 127)
    if found is None:
        return None
    codes, scales = found
    return PackedLinear("q8_0", codes.reshape(rows, inputs).to(torch.int8), scales.to(torch.float16), None, bias)


def packed_layer(linear: nn.Linear) -> PackedLinear | None:
    """`linear` as a PackedLinear holding exactly its weight, or None."""
    weight = linear.weight.detach()
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return q4_1_layer(weight, bias) or q8_0_layer(weight, bias)


def packed_routed(module: RoutedMLP) -> PackedRoutedMLP | None:
    """A routed FFN with every weight an exact Q4_1 block value as a PackedRoutedMLP (its
    down projection back in the neurons' original order to find its blocks), or None:
    no recorded neuron order, the oracle router (it reads every expert), or weights that
    are not Q4_1 blocks."""
    order = module.neuron_order
    if order is None or module.router is None or module.hidden % (2 * BLOCK):
        return None
    columns = module.columns().detach()                                   # [E, d, 2m]
    gate_up = q4_1_layer(columns.permute(0, 2, 1).reshape(-1, module.hidden), None)
    neurons = module.down.detach().reshape(-1, module.hidden)              # [N, d], expert order
    original = torch.empty_like(neurons)
    original[order.long()] = neurons
    down = q4_1_layer(original.T.contiguous(), None)                       # [d, N]: blocks along the neurons
    if gate_up is None or down is None:
        return None
    per_output = torch.cat((down.codes & 15, down.codes >> 4), dim=1)[:, order.long()].T    # [N, d]
    half = module.hidden // 2
    codes = (per_output[:, :half] | (per_output[:, half:] << 4)).contiguous()
    numbers = torch.stack((down.scale.T, down.offset.T), dim=1).contiguous()               # [B, 2, d]
    block_of = (order // BLOCK).to(torch.int32)
    return PackedRoutedMLP(gate_up.rows, codes, numbers, block_of, module.router, module.k, module.count,
                           module.act)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's linear layers by name, leaving out those inside routed FFNs."""
    routed = [name for name, module in model.named_modules() if isinstance(module, RoutedMLP)]
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(name.startswith(f"{prefix}.") for prefix in routed)}


def pack_linears(model: nn.Module, kernel: str = "exact") -> tuple[dict[str, nn.Module], PackingReport]:
    """The model's linear layers whose weights are exact block values, packed and computed
    with `kernel` (one of DECODE_KERNELS), and what the decode program reads per token."""
    layers = linear_layers(model)
    packed = {name: layer for name, layer in ((name, packed_layer(linear)) for name, linear in layers.items())
              if layer is not None}
    kinds = [layer.kind for layer in packed.values()]
    if kernel != "exact":
        packed = {name: KernelLinear.from_packed(layer, split_inputs=kernel == "bf16x2")
                  for name, layer in packed.items()}
    routed = {name: module for name, module in model.named_modules() if isinstance(module, RoutedMLP)}
    packed_ffns = {name: ffn for name, ffn in ((name, packed_routed(module)) for name, module in routed.items())
                   if ffn is not None} if kernel == "exact" else {}
    float32_bytes = sum(linear.weight.numel() * 4 for linear in layers.values())
    unpacked_bytes = sum(linear.weight.numel() * 4 for name, linear in layers.items() if name not in packed)
    report = PackingReport(q4_1=kinds.count("q4_1"), q8_0=kinds.count("q8_0"),
                           float32=len(layers) - len(packed), float32_bytes=float32_bytes,
                           packed_bytes=unpacked_bytes + sum(layer.weight_bytes() for layer in packed.values()),
                           routed=len(packed_ffns), routed_float32=len(routed) - len(packed_ffns))
    return {**packed, **packed_ffns}, report


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """`model` with the submodules named in `replacements` replaced while the block runs."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_submodule(model, name, module)
        yield model
    finally:
        for name, module in originals.items():
            set_submodule(model, name, module)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
