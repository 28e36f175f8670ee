"""A linear layer whose float32 weight is held as the block-quantized codes it came from.

A weight dequantized from a GGUF Q4_1 or Q8_0 file is, block of 32 inputs by block, an
exact function of small integer codes and two float16 numbers per block:

- Q4_1: `w = d * q + m`, `q` in 0..15 (stored two per byte);
- Q8_0: `w = d * q`, `q` in -128..127.

`d * q` is exact in float32 (an 11-bit mantissa times at most 8 bits), so rebuilding the
weight from its codes inside the product gives the float32 weight bit for bit. The layer
computes the same float32 product as `nn.Linear` (only the summation order differs) while
reading 0.625 (Q4_1) or 1.0625 (Q8_0) bytes per weight instead of 4: one decoding step is
bound by the bytes it reads. The product is written as a broadcast multiply and a sum so
that Inductor fuses decoding into the reduction; eager torch would materialise the
weight, so only the inductor decode program uses this layer.
"""
from __future__ import annotations

import torch
from torch import nn

BLOCK = 32


class PackedLinear(nn.Module):
    """`forward(x [..., K]) -> [..., N]` with the weight rebuilt from block codes.

    `codes`: Q4_1 `[N, K/2]` uint8 (low nibble: input k, high nibble: input k + K/2),
    Q8_0 `[N, K]` int8; `scale`, `offset`: `[N, K/32]` float16 (`offset` is None for Q8_0)."""

    def __init__(self, kind: str, codes: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.kind = kind
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("bias", bias)
        self.out_features = codes.shape[0]
        self.in_features = scale.shape[1] * BLOCK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 1, self.in_features)
        if self.kind == "q4_1":
            half = self.in_features // 2
            out = self.blocks_product(rows[..., :half], self.codes & 15, slice(None, half // BLOCK)) \
                + self.blocks_product(rows[..., half:], self.codes >> 4, slice(half // BLOCK, None))
        else:
            out = self.blocks_product(rows, self.codes, slice(None))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def blocks_product(self, rows, codes, blocks: slice):
        """sum_k rows[..., k] * w[:, k] over the inputs of `blocks`, w rebuilt from `codes`."""
        scale = self.scale[:, blocks, None].to(torch.float32)
        weight = codes.to(torch.float32).view(self.out_features, -1, BLOCK) * scale
        if self.offset is not None:
            weight = weight + self.offset[:, blocks, None].to(torch.float32)
        inputs = rows.reshape(rows.shape[0], 1, -1, BLOCK)
        return (inputs * weight).sum((-1, -2))

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"

    def weight_bytes(self) -> int:
        tensors = (self.codes, self.scale, self.offset, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
