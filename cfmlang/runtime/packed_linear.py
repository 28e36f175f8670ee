"""A linear layer whose float32 weight is held as the block-quantized codes it came from.

A weight dequantized from a GGUF Q4_1 or Q8_0 file is, block of 32 inputs by block, an
exact function of small integer codes and two float16 numbers per block:

- Q4_1: `w = d * q + m`, `q` in 0..15 (stored two per byte);
- Q8_0: `w = d * q`, `q` in -128..127.

`d * q` is exact in float32 (an 11-bit mantissa times at most 8 bits), so rebuilding the
weight from its codes inside the product gives the float32 weight bit for bit. The layer
computes the same float32 product as `nn.Linear` (only the summation order differs) while
reading 0.625 (Q4_1) or 1.0625 (Q8_0) bytes per weight instead of 4: one decoding step is
bound by the bytes it reads. The product is cfmlang's native kernel
(`torch.ops.cfmlang.q4_1_linear` / `q8_0_linear`, `runtime/kernels/packed_linear.cpp`,
built by `runtime.native`): it rebuilds each weight in registers with one fused
multiply-add, accumulates in float32 and splits the output rows over all threads.
Inductor's own fused form of the same product ran one thread per decode step (its
parallel loop is over the batch) at about 0.6x of the kernel's speed on one thread.
"""
from __future__ import annotations

import torch
from torch import nn

from cfmlang.runtime import native

BLOCK = 32


class PackedLinear(nn.Module):
    """`forward(x [..., K]) -> [..., N]` with the weight rebuilt from block codes.

    Built from `codes`: Q4_1 `[N, K/2]` uint8 (low nibble: input k, high nibble: input
    k + K/2), Q8_0 `[N, K]` int8; `scale`, `offset`: `[N, K/32]` float16 (`offset` is None
    for Q8_0). Held as one uint8 row per output (`rows`): the row's codes, then its blocks'
    float16 numbers, (d, m) pairs for Q4_1 and d for Q8_0, so that the kernel reads each
    weight row as one stream."""

    def __init__(self, kind: str, codes: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.kind = kind
        self.out_features = codes.shape[0]
        self.in_features = scale.shape[1] * BLOCK
        numbers = scale if offset is None else torch.stack((scale, offset), dim=-1)
        numbers = numbers.contiguous().view(torch.uint8).reshape(self.out_features, -1)
        self.register_buffer("rows", torch.cat((codes.view(torch.uint8), numbers), dim=1).contiguous())
        self.register_buffer("bias", bias)

    @property
    def code_bytes(self) -> int:
        return self.in_features // 2 if self.kind == "q4_1" else self.in_features

    @property
    def codes(self) -> torch.Tensor:
        codes = self.rows[:, :self.code_bytes]
        return codes if self.kind == "q4_1" else codes.view(torch.int8)

    def numbers(self) -> torch.Tensor:
        """The blocks' float16 numbers: `[N, K/32, 2]` (d, m) for Q4_1, `[N, K/32]` d for Q8_0."""
        halves = self.rows[:, self.code_bytes:].contiguous().view(torch.float16)
        return halves.view(self.out_features, -1, 2) if self.kind == "q4_1" else halves

    @property
    def scale(self) -> torch.Tensor:
        return self.numbers()[..., 0] if self.kind == "q4_1" else self.numbers()

    @property
    def offset(self) -> torch.Tensor | None:
        return self.numbers()[..., 1] if self.kind == "q4_1" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native.load()       # at first use: `--decode-kernel bf16` packs through this class without the kernel
        flat = x.reshape(-1, self.in_features)
        if self.kind == "q4_1":
            out = torch.ops.cfmlang.q4_1_linear(flat, self.rows)
        else:
            out = torch.ops.cfmlang.q8_0_linear(flat, self.rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def rebuilt_weight(self) -> torch.Tensor:
        """The float32 weight `[N, K]` the codes stand for (bit for bit the packed one)."""
        codes = torch.cat((self.codes & 15, self.codes >> 4), dim=1) if self.kind == "q4_1" else self.codes
        blocks = codes.to(torch.float32).view(self.out_features, -1, BLOCK) * self.scale[..., None].to(torch.float32)
        if self.offset is not None:
            blocks = blocks + self.offset[..., None].to(torch.float32)
        return blocks.reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"

    def weight_bytes(self) -> int:
        tensors = (self.rows, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


INT4_GROUP = BLOCK
INT4_INNER_K_TILES = 1      # what torch's CPU int4 packing takes (it packs rows, not K tiles)


class KernelLinear(nn.Module):
    """A packed linear layer computed by torch's weight-only CPU kernels, with bfloat16
    activations (their float32 and float16 paths are reference loops, 30x slower than a
    float32 matmul on an AVX-512 CPU).

    - `int4` (from Q4_1): `aten._weight_int4pack_mm_for_cpu` over
      `_convert_weight_to_int4pack_for_cpu` codes, groups of 32 inputs, each with a scale and
      a zero: `w = (q - 8) * d + (m + 8 d)`, the Q4_1 block `d * q + m` with `d` and
      `m + 8 d` rounded to bfloat16 (a weight moves by at most 2^-9 of its block's range).
    - `int4x2` (from Q8_0, the default): the 8-bit codes as two 4-bit halves over twice the
      inputs (`split_q8_0`), the same int4 kernel; only the block scale is rounded.
    - `int8` (from Q8_0, `split_int8=False`): `aten._weight_int8pack_mm`, which takes one
      scale per output row, so the block values are requantized per row
      (`s = max |w| / 127`): a weight moves by up to half a row step; about 1.5x the
      logits' error of `int4x2` for the same bytes read per weight (1 vs 1 + 1/8).

    The input is rounded to bfloat16 (or, with `split_inputs`, split into a bfloat16 high
    part and a bfloat16 remainder, two rows of one product), and the kernels' outputs are
    bfloat16: that rounding, 2^-9 of each output, is what remains of the error then."""

    def __init__(self, kind: str, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int, split_inputs: bool = False):
        super().__init__()
        self.kind, self.split_inputs = kind, split_inputs
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = in_features, out_features

    @staticmethod
    def from_packed(layer: PackedLinear, split_inputs: bool = False, split_int8: bool = True) -> "KernelLinear":
        """The kernel form of a PackedLinear (its weights rounded as the class docstring says)."""
        if layer.kind == "q4_1":
            codes = torch.cat((layer.codes & 15, layer.codes >> 4), dim=1).to(torch.int32)
            scale, offset = layer.scale.to(torch.float32), layer.offset.to(torch.float32)
            scale_zero = torch.stack((scale, offset + 8 * scale), dim=-1).transpose(0, 1)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INT4_INNER_K_TILES)
            return KernelLinear("int4", packed, scale_zero.to(torch.bfloat16).contiguous(), layer.bias,
                                layer.in_features, layer.out_features, split_inputs)
        if split_int8:
            return KernelLinear.split_q8_0(layer, split_inputs)
        weight = layer.rebuilt_weight()
        row_scale = (weight.abs().amax(dim=1) / 127).to(torch.bfloat16)
        safe = torch.where(row_scale > 0, row_scale.to(torch.float32), 1.0)
        codes = (weight / safe[:, None]).round().clamp(-127, 127).to(torch.int8)
        return KernelLinear("int8", codes, row_scale, layer.bias, layer.in_features, layer.out_features,
                            split_inputs)

    @staticmethod
    def split_q8_0(layer: PackedLinear, split_inputs: bool = False) -> "KernelLinear":
        """Q8_0 codes as two 4-bit halves over twice the inputs: `q + 128 = 16 h + l`, so
        `d q = 16 d (h - 8) + d (l - 8) + 8 d`; the input is fed twice."""
        shifted = layer.codes.to(torch.int32) + 128
        codes = torch.cat((shifted >> 4, shifted & 15), dim=1)
        scale = layer.scale.to(torch.float32)
        high = torch.stack((16 * scale, torch.zeros_like(scale)), dim=-1)
        low = torch.stack((scale, 8 * scale), dim=-1)
        scale_zero = torch.cat((high, low), dim=1).transpose(0, 1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INT4_INNER_K_TILES)
        return KernelLinear("int4x2", packed, scale_zero.to(torch.bfloat16).contiguous(), layer.bias,
                            layer.in_features, layer.out_features, split_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.to(torch.bfloat16)
        if self.split_inputs:
            rows = torch.cat((rows, (flat - rows.to(flat.dtype)).to(torch.bfloat16)), dim=0)
        if self.kind == "int4x2":
            rows = torch.cat((rows, rows), dim=1)
        if self.kind != "int8":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, INT4_GROUP, self.scales)
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        out = out.to(x.dtype)
        if self.split_inputs:
            out = out[:flat.shape[0]] + out[flat.shape[0]:]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"

    def weight_bytes(self) -> int:
        tensors = (self.weight, self.scales, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
