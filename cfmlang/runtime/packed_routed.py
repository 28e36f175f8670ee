"""A routed FFN whose gate, up and down weights are held as the GGUF Q4_1 codes they came
from: the exact packed decode program's form of `RoutedMLP` (one token per sequence).

The routed artifact keeps the FFN's neurons in expert order, so its gate and up rows are
still Q4_1 rows (blocks run along the hidden inputs), but the down projection's blocks ran
along the neurons, which the expert order shuffled. The neurons' original order
(`routing.safetensors`, `layers.N.order`) puts them back: the down weight in that order is
Q4_1 again, and each neuron's column is stored as its codes (one per output) and the index
of the block it belonged to, whose float16 (d, m) per output are kept once
(`numbers [blocks, 2, hidden]`). Per token the module reads the chosen experts' gate/up
rows and down columns, and each touched block's numbers:

    pre    = q4_1_gather(x, rows, chosen, 2m)             # [T, k*2m]: gate rows, then up rows
    active = act(gate) * up                               # [T, k*m]
    out    = q4_1_columns(active, codes, numbers, block_of, chosen, m)

Every weight is rebuilt as fma(q, d, m), bit for bit the float32 weight; sums are float32.
"""
from __future__ import annotations

import torch
from torch import nn

from cfmlang.runtime import native


class PackedRoutedMLP(nn.Module):
    """`forward(x [..., d]) -> [..., d]`: the routed FFN of `router` (top `k` of `count`
    experts of `size` neurons each) with packed weights (see the module docstring)."""

    def __init__(self, rows: torch.Tensor, codes: torch.Tensor, numbers: torch.Tensor, block_of: torch.Tensor,
                 router: nn.Module, k: int, count: int, act):
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("codes", codes)
        self.register_buffer("numbers", numbers)
        self.register_buffer("block_of", block_of)
        self.router, self.k, self.count, self.act = router, k, count, act
        self.size = codes.shape[0] // count
        self.hidden = numbers.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native.load()       # at first use, as PackedLinear
        flat = x.reshape(-1, self.hidden)
        chosen = self.router(flat).topk(self.k, dim=-1, sorted=False).indices.sort(dim=-1).values
        pre = torch.ops.cfmlang.q4_1_gather(flat, self.rows, chosen, 2 * self.size)
        gate, up = pre.view(flat.shape[0], self.k, 2 * self.size).split(self.size, dim=-1)
        active = (self.act(gate) * up).reshape(flat.shape[0], self.k * self.size)
        out = torch.ops.cfmlang.q4_1_columns(active, self.codes, self.numbers, self.block_of, chosen, self.size)
        return out.view(x.shape)
