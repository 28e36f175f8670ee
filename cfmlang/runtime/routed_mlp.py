"""The routed FFN: a gated (SwiGLU-style) FFN whose neurons form `count` equal experts,
of which each token runs only the `k` its router picks.

The artifact stores the FFN weights with neurons already permuted so that expert `e`
owns rows `[e*m, (e+1)*m)` of `gate_proj`/`up_proj` (columns of `down_proj`), so the
dense model (which a neuron permutation does not change) stays loadable by transformers.
`pack` turns them into the pre-packed expert weights:

    gate_up [E, d, 2m]   per expert, gate_proj rows then up_proj rows, transposed
    down    [E, m, d]    per expert, down_proj columns, transposed

Two formulations compute the same function (k = E gives the dense FFN up to float
summation order):

- gather (decode, few tokens): reads only k/E of the FFN weights. Down is an
  `embedding_bag` over the chosen experts' rows weighted by the activations (a fused
  gather-and-reduce that copies nothing). Gate/up depends on the expert size m: for
  m >= ROWS_BELOW, an `embedding_bag` over the chosen experts' packed rows weighted by the
  token's hidden state; for smaller experts (down to one neuron each, where those rows are
  a few floats wide) the module keeps gate_up as rows, [E, 2m, d], and gathers each chosen
  expert's [2m, d] block with `embedding` before one batched product. Chosen experts are
  gathered in ascending order, so the weights stream from memory in order.
- masked (prefill, many tokens): the dense FFN (one batched product per projection; one
  linear for gate/up when gate_up is kept as rows) with the activations of unchosen
  experts multiplied by a 0/1 mask.

`forward` picks by shape (gather when tokens * k < count). Neither formulation has a
data-dependent shape: the expert indices come from `topk` (static k), selection is
`embedding_bag` with fixed-size bags and `scatter`, so both trace with `torch.export`
(no `nonzero`, no boolean indexing, no `.item()`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cfmlang.diagnostics import CompileError, error

FORMULATIONS = ("auto", "gather", "masked")
DOWN_BAGS = (8, 4, 2, 1)  # each token's down rows are summed in this many bags (threads take bags)
ROWS_BELOW = 8           # experts of fewer neurons gather gate/up as [2m, d] row blocks
QUANT_GROUPS = (64, 32, 128, 256)   # group sizes the CPU int4 kernel takes, preferred first
QUANT_LEVELS = 15        # 4 bits
KERNEL_ROWS = 16         # the CPU int4 kernel takes row counts that are multiples of this


def pack(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, d, 2m], down [E, m, d]) from the weights of a gated FFN whose neurons
    are ordered expert by expert (gate, up: [N, d]; down: [d, N])."""
    neurons, hidden = gate.shape
    size = neurons // count
    gate_up = torch.cat([gate.reshape(count, size, hidden), up.reshape(count, size, hidden)], dim=1)
    return gate_up.transpose(1, 2).contiguous(), down.t().reshape(count, size, hidden).contiguous()


def expert_activations(x: torch.Tensor, gate_up: torch.Tensor, act) -> torch.Tensor:
    """Neuron activations act(g.x) * (u.x) of every expert: [T, E, m] for x [T, d]."""
    pre = torch.matmul(x.unsqueeze(0), gate_up).transpose(0, 1)      # [T, E, 2m]
    gate, up = pre.split(gate_up.shape[-1] // 2, dim=-1)
    return act(gate) * up


def expert_mass(x: torch.Tensor, gate_up: torch.Tensor, act) -> torch.Tensor:
    """The activation mass sum_n |a_n| of each expert per token: [T, E]."""
    return expert_activations(x, gate_up, act).abs().sum(-1)


class SimilarityRouter(nn.Module):
    """MoEfication's parameter-centre router: expert centres are the means of their
    neurons' normalized gate rows; a token picks the centres nearest (Euclidean) to its
    normalized hidden state, i.e. the largest x.c - |c|^2/2."""

    def __init__(self, centres: torch.Tensor):
        super().__init__()
        self.centres = nn.Parameter(centres, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(x, dim=-1)
        return unit @ self.centres.t() - 0.5 * (self.centres * self.centres).sum(-1)


class MlpRouter(nn.Module):
    """A two-layer predictor of each expert's activation mass from the normalized hidden
    state: w2 tanh(w1 x)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.w1 = nn.Parameter(w1, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.normalize(x, dim=-1) @ self.w1.t()) @ self.w2.t()


def quantize_rows(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 4-bit copy of `weight` [R, d] (an odd d padded with a zero column): per group of
    inputs (the first of QUANT_GROUPS that divides d, else the whole row) a minimum and a
    step; `codes` [R, d/2] holds two 4-bit codes per byte, low nibble first, and
    w ~ mins + codes * scales."""
    weight = F.pad(weight.float(), (0, weight.shape[1] % 2))
    rows, width = weight.shape
    group = next((g for g in QUANT_GROUPS if width % g == 0), width)
    grouped = weight.reshape(rows, width // group, group)
    mins, maxs = grouped.amin(-1), grouped.amax(-1)
    scales = (maxs - mins).clamp_min(1e-12) / QUANT_LEVELS
    codes = ((grouped - mins.unsqueeze(-1)) / scales.unsqueeze(-1)).round().clamp(0, QUANT_LEVELS)
    codes = codes.to(torch.uint8).reshape(rows, width)
    return {"codes": codes[:, 0::2] | (codes[:, 1::2] << 4), "scales": scales, "mins": mins}


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[R, 2c] int32 codes from the packed [R, c] bytes."""
    return torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1).to(torch.int32)


class QuantizedRouter(nn.Module):
    """Predicts each expert's activation mass sum_n |act(g_n.x) (u_n.x)| from a 4-bit copy
    of its neurons' gate and up rows (`quantize_rows` of the gate rows of every neuron in
    expert order, then the up rows). On CPU the product runs in the int4 kernel of torch
    (`_weight_int4pack_mm_for_cpu`, bfloat16 activations: the scores only rank); elsewhere
    the copy is dequantized for each call."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, act, count: int):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.act, self.count = act, count
        self.width = codes.shape[1] * 2
        self.group = self.width // scales.shape[1]
        kernel = (self.group in QUANT_GROUPS and len(codes) % KERNEL_ROWS == 0
                  and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(codes), 1)
                             if kernel else None, persistent=False)
        self.register_buffer("scale_zero", torch.stack([scales.t(), (mins + 8 * scales).t()], dim=-1).to(
            torch.bfloat16).contiguous() if kernel else None, persistent=False)

    def dequantized(self) -> torch.Tensor:
        codes = unpack_codes(self.codes).float().view(len(self.codes), -1, self.group)
        return (self.mins.float().unsqueeze(-1) + codes * self.scales.float().unsqueeze(-1)).view(len(self.codes), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.width:
            x = F.pad(x, (0, self.width - x.shape[-1]))
        if self.packed is not None and x.device.type == "cpu":
            pre = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16).contiguous(), self.packed, self.group, self.scale_zero).float()
        else:
            pre = x.float() @ self.dequantized().t()
        gate, up = pre.chunk(2, dim=-1)
        mass = (self.act(gate) * up).abs()
        return mass if mass.shape[-1] == self.count else mass.view(x.shape[0], self.count, -1).sum(-1)


def neuron_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """[2N, d]: the gate rows of every neuron in expert order, then the up rows, from
    gate_up packed as [E, d, 2m]."""
    count, hidden, double = gate_up.shape
    rows = gate_up.permute(2, 0, 1)                     # [2m, E, d]
    return torch.cat([rows[: double // 2].transpose(0, 1).reshape(-1, hidden),
                      rows[double // 2:].transpose(0, 1).reshape(-1, hidden)])


RouterLoader = Callable[[dict[str, torch.Tensor], Callable, int], Optional[nn.Module]]
"""(tensors stored for a layer, the FFN's activation, expert count) -> the router module
(None: the FFN computes every expert's true mass, as the oracle does)."""
ROUTER_LOADERS: dict[str, RouterLoader] = {
    "similarity": lambda tensors, act, count: SimilarityRouter(tensors["centres"]),
    "mlp": lambda tensors, act, count: MlpRouter(tensors["w1"], tensors["w2"]),
    "quantized": lambda tensors, act, count: QuantizedRouter(tensors["codes"], tensors["scales"],
                                                             tensors["mins"], act, count),
    "oracle": lambda tensors, act, count: None,
}
"""Routers of top-k routes by name; `cfmlang.ops.experts.routers.register_router` adds one."""


def make_router(kind: str, tensors: dict[str, torch.Tensor], act, count: int) -> nn.Module | None:
    """The router module of `kind` from its tensors (None for the oracle, which reads the
    FFN's own activations)."""
    if kind not in ROUTER_LOADERS:
        raise CompileError([error("E091", f"the artifact routes with router `{kind}`, which is not registered "
                                  f"(registered: {', '.join(ROUTER_LOADERS)})", None,
                                  "import the module that registers it (register_router) before loading")])
    return ROUTER_LOADERS[kind](tensors, act, count)


class RoutedMLP(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, router: nn.Module | None,
                 k: int, act, formulation: str = "auto"):
        super().__init__()
        self.count, self.size, self.hidden = down.shape
        self.rows = self.size < ROWS_BELOW
        self.gate_up = nn.Parameter(gate_up.transpose(1, 2).contiguous() if self.rows else gate_up,
                                    requires_grad=False)
        self.down = nn.Parameter(down, requires_grad=False)
        self.router = router
        self.k = k
        self.act = act
        self.formulation = formulation
        # the original index of each neuron (routed artifacts record it): lets the inductor
        # target put the down projection back into GGUF blocks and pack it (lower.packing)
        self.neuron_order: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, mlp: nn.Module, count: int, router: nn.Module | None, k: int) -> "RoutedMLP":
        """Pack a gated HF MLP (gate_proj, up_proj, down_proj, act_fn) whose neurons are
        already ordered expert by expert."""
        gate_up, down = pack(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                             mlp.down_proj.weight.detach(), count)
        return cls(gate_up, down, router, k, mlp.act_fn)

    def columns(self) -> torch.Tensor:
        """gate_up as `pack` lays it out, [E, d, 2m] (a view when the module keeps rows)."""
        return self.gate_up.transpose(1, 2) if self.rows else self.gate_up

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return self.activations(flat).abs().sum(-1)
        return self.router(flat)

    def activations(self, flat: torch.Tensor) -> torch.Tensor:
        """act(g.x) * (u.x) of every neuron of every expert, [T, E, m]. With row blocks the
        gate/up product is one linear over all neurons (as in the dense FFN): its row-major
        result leaves eager and Inductor the same layout for every later product, so the
        same GEMM and the same bits (through a broadcast matmul, eager's activations came
        out expert-major and Inductor's token-major, and the down product's two GEMMs
        differed in the last bits on an AVX-512 CPU, enough to flip per-neuron routing)."""
        if not self.rows:
            return expert_activations(flat, self.columns(), self.act)
        pre = F.linear(flat, self.gate_up.view(-1, self.hidden)).view(flat.shape[0], self.count, -1)
        gate, up = pre.split(self.size, dim=-1)
        return self.act(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen = self.scores(flat).topk(self.k, dim=-1, sorted=False).indices
        if self.uses_gather(flat.shape[0]):
            out = self.gathered(flat, chosen.sort(dim=-1).values)
        else:
            out = self.masked(flat, chosen)
        return out.view(x.shape)

    def uses_gather(self, tokens: int) -> bool:
        if self.formulation == "auto":
            return tokens * self.k < self.count
        return self.formulation == "gather"

    def gathered(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Only the chosen experts' weights: their gate/up pre-activations, then for each
        token a bag of the k*m rows of the chosen down blocks weighted by the activations."""
        tokens = flat.shape[0]
        pre = self.gathered_rows(flat, chosen) if self.rows else self.gathered_columns(flat, chosen)
        gate, up = pre.split(self.size, dim=-1)
        active = (self.act(gate) * up).reshape(tokens, self.k * self.size)
        rows = chosen if self.size == 1 else (
            chosen.unsqueeze(-1) * self.size + torch.arange(self.size, device=flat.device)).view(tokens, -1)
        bags = next(b for b in DOWN_BAGS if (self.k * self.size) % b == 0)
        out = F.embedding_bag(rows.view(tokens * bags, -1), self.down.view(self.count * self.size, self.hidden),
                              per_sample_weights=active.view(tokens * bags, -1), mode="sum")
        return out.view(tokens, bags, self.hidden).sum(1)

    def gathered_columns(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """[T*k, 2m]: for each (token, expert) a bag of the d rows of its [d, 2m] gate_up
        block weighted by the token's x."""
        tokens, hidden = flat.shape
        inputs = torch.arange(hidden, device=flat.device)
        rows = (chosen.unsqueeze(-1) * hidden + inputs).view(tokens * self.k, hidden)
        weights = flat.unsqueeze(1).expand(tokens, self.k, hidden).reshape(tokens * self.k, hidden)
        return F.embedding_bag(rows, self.gate_up.view(self.count * hidden, -1),
                               per_sample_weights=weights, mode="sum")

    def gathered_rows(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """[T, k, 2m]: each chosen expert's [2m, d] gate_up block times the token's x.

        The blocks are gathered as single rows of gate_up viewed [E*2m, d] (rows
        e*2m .. e*2m+2m-1 for expert e). Gathering whole [2m*d] blocks copies the same
        bytes, but Inductor, which fuses the gather into the product, then indexes each
        weight through a modulo and cannot vectorize: the lowered decode FFN took 1.9x as
        long (AOTInductor, SmolLM2, one neuron per expert, 50% active)."""
        tokens, hidden = flat.shape
        width = 2 * self.size
        rows = torch.add(torch.arange(width, device=flat.device), chosen.unsqueeze(-1), alpha=width)
        blocks = F.embedding(rows.view(tokens, -1), self.gate_up.view(-1, hidden))   # [T, 2km, d]
        return (blocks @ flat.unsqueeze(-1)).view(tokens, self.k, width)

    def masked(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The dense FFN with unchosen experts' activations zeroed."""
        active = self.activations(flat)
        keep = torch.zeros(flat.shape[0], self.count, dtype=flat.dtype, device=flat.device)
        keep = keep.scatter(1, chosen, 1.0)
        active = active * keep.unsqueeze(-1)
        return active.reshape(flat.shape[0], -1) @ self.down.view(self.count * self.size, self.hidden)
