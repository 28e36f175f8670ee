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

- gather (decode, few tokens): `embedding_bag` over the chosen experts' packed rows,
  weighted by the token's hidden state (for gate/up) and by the activations (for down):
  a fused gather-and-reduce that reads only k/E of the FFN weights and copies none.
- masked (prefill, many tokens): the dense FFN (one batched product per projection)
  with the activations of unchosen experts multiplied by a 0/1 mask.

`forward` picks by shape (gather when tokens * k < count). Neither formulation has a
data-dependent shape: the expert indices come from `topk` (static k), selection is
`embedding_bag` with fixed-size bags and `scatter`, so both trace with `torch.export`
(no `nonzero`, no boolean indexing, no `.item()`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("similarity", "mlp", "oracle")
FORMULATIONS = ("auto", "gather", "masked")


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


def make_router(kind: str, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    """The router module of `kind` from its tensors (None for the oracle, which reads the
    FFN's own activations)."""
    if kind == "similarity":
        return SimilarityRouter(tensors["centres"])
    if kind == "mlp":
        return MlpRouter(tensors["w1"], tensors["w2"])
    return None


class RoutedMLP(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, router: nn.Module | None,
                 k: int, act, formulation: str = "auto"):
        super().__init__()
        self.gate_up = nn.Parameter(gate_up, requires_grad=False)
        self.down = nn.Parameter(down, requires_grad=False)
        self.router = router
        self.count, self.size, self.hidden = down.shape
        self.k = k
        self.act = act
        self.formulation = formulation

    @classmethod
    def from_dense(cls, mlp: nn.Module, count: int, router: nn.Module | None, k: int) -> "RoutedMLP":
        """Pack a gated HF MLP (gate_proj, up_proj, down_proj, act_fn) whose neurons are
        already ordered expert by expert."""
        gate_up, down = pack(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                             mlp.down_proj.weight.detach(), count)
        return cls(gate_up, down, router, k, mlp.act_fn)

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return expert_mass(flat, self.gate_up, self.act)
        return self.router(flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen = self.scores(flat).topk(self.k, dim=-1).indices
        if self.uses_gather(flat.shape[0]):
            out = self.gathered(flat, chosen)
        else:
            out = self.masked(flat, chosen)
        return out.view(x.shape)

    def uses_gather(self, tokens: int) -> bool:
        if self.formulation == "auto":
            return tokens * self.k < self.count
        return self.formulation == "gather"

    def gathered(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Only the chosen experts' weights: for each (token, expert) a bag of the d rows
        of its gate_up block weighted by the token's x, then for each token a bag of the
        k*m rows of the chosen down blocks weighted by the activations."""
        tokens, hidden = flat.shape
        inputs = torch.arange(hidden, device=flat.device)
        rows = (chosen.unsqueeze(-1) * hidden + inputs).view(tokens * self.k, hidden)
        weights = flat.unsqueeze(1).expand(tokens, self.k, hidden).reshape(tokens * self.k, hidden)
        pre = F.embedding_bag(rows, self.gate_up.view(self.count * hidden, -1),
                              per_sample_weights=weights, mode="sum")          # [T*k, 2m]
        gate, up = pre.split(self.size, dim=-1)
        active = (self.act(gate) * up).view(tokens, self.k * self.size)
        neurons = torch.arange(self.size, device=flat.device)
        rows = (chosen.unsqueeze(-1) * self.size + neurons).view(tokens, self.k * self.size)
        return F.embedding_bag(rows, self.down.view(self.count * self.size, hidden),
                               per_sample_weights=active, mode="sum")

    def masked(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The dense FFN with unchosen experts' activations zeroed."""
        active = expert_activations(flat, self.gate_up, self.act)
        keep = torch.zeros(flat.shape[0], self.count, dtype=flat.dtype, device=flat.device)
        keep = keep.scatter(1, chosen, 1.0)
        active = active * keep.unsqueeze(-1)
        return active.reshape(flat.shape[0], -1) @ self.down.view(self.count * self.size, self.hidden)
