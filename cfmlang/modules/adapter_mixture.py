"""Routing over LoRA adapters at run time: every adapter's factors stacked per linear
module and mixed by coefficients, per sequence (`retrieve`, LoraRetriever-style) or per
token (`gate`, a small gate per decoder layer, X-LoRA/MoLE-style).

Each adapted linear computes, with the N adapters' factors zero-padded to one rank R,

    y = W x + ((x @ A_all^T) * repeat(c, R)) @ B_all^T       A_all: [N*R, in], B_all: [N*R, out]

two matmuls whatever the coefficients c ([batch, tokens or 1, N]) select: a top-k choice
is a mask on c, so the module has no data-dependent shapes and no Python branching per
input, and `torch.export` captures it whole.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cfmlang.stdlib.lora import LoraFactors

MIXES = ("softmax", "uniform")

Adapter = dict[str, LoraFactors]
"""Factors by module path (e.g. `model.layers.0.self_attn.q_proj`): the `modules` of a
compiled lora brick (`cfmlang.stdlib.lora.LoraAdapter`)."""


class Coefficients:
    """The mixing weights the adapted linears read during one forward pass: one tensor
    [batch, tokens or 1, N] for every layer (retrieve), or one per decoder layer (gate)."""

    def __init__(self):
        self.shared: torch.Tensor | None = None
        self.per_layer: dict[int, torch.Tensor] = {}

    def for_layer(self, layer: int) -> torch.Tensor:
        return self.per_layer[layer] if layer in self.per_layer else self.shared


class MixedLinear(nn.Module):
    """A frozen linear layer plus N stacked LoRA deltas mixed by coefficients."""

    def __init__(self, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, rank: int,
                 layer: int, coefficients: Coefficients):
        super().__init__()
        self.base = base
        self.register_buffer("down", down)      # [N*R, in]
        self.register_buffer("up", up)          # [N*R, out]
        self.rank = rank
        self.layer = layer
        self.coefficients = coefficients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.coefficients.for_layer(self.layer).to(x.dtype).repeat_interleave(self.rank, dim=-1)
        return self.base(x) + ((x @ self.down.t()) * mix) @ self.up


def stacked(adapters: list[Adapter], module: str, base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A_all [N*R, in], B_all [N*R, out] with the scale folded in, R): adapters without
    this module, and ranks below R, get zero rows, which add exactly nothing."""
    rank = max((a[module].down.shape[0] for a in adapters if module in a), default=0)
    count, out_features, in_features = len(adapters), base.out_features, base.in_features
    down = torch.zeros(count, rank, in_features, dtype=base.weight.dtype)
    up = torch.zeros(count, rank, out_features, dtype=base.weight.dtype)
    for index, adapter in enumerate(adapters):
        if module in adapter:
            factors = adapter[module]
            r = factors.down.shape[0]
            down[index, :r] = factors.down.to(down.dtype)
            up[index, :r] = (factors.up.double() * factors.scale).t().to(up.dtype)
    return down.reshape(count * rank, in_features), up.reshape(count * rank, out_features), rank


def layer_of(module: str) -> int:
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1])


def attach(model: nn.Module, adapters: list[Adapter], coefficients: Coefficients) -> list[str]:
    """Replace every linear module that some adapter targets by a MixedLinear; returns
    the module paths replaced."""
    modules = sorted({m for adapter in adapters for m in adapter})
    for module in modules:
        parent_path, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        down, up, rank = stacked(adapters, module, base)
        setattr(parent, child, MixedLinear(base, down, up, rank, layer_of(module), coefficients))
    return modules


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule("model.layers")


def top_k_weights(scores: torch.Tensor, k: int, mix: str, temperature: float) -> torch.Tensor:
    """Mixing weights over the last dimension: zero outside the k best scores; inside,
    a softmax of score / temperature, or 1/k each. Static shapes throughout."""
    best, chosen = torch.topk(scores, k, dim=-1)
    if mix == "softmax":
        weights = torch.softmax(best / temperature, dim=-1)
    else:
        weights = torch.full_like(best, 1.0 / k)
    return torch.zeros_like(scores).scatter(-1, chosen, weights)


def mean_hidden_state(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The embedder: the last hidden state averaged over the (unpadded) tokens, [batch, hidden]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class AdapterMixture(nn.Module):
    """A causal LM whose LoRA adapters are mixed per input. `forward` and `generate`
    take and return what the wrapped transformers model does."""

    def __init__(self, model: nn.Module, adapters: list[Adapter], names: list[str], method: str,
                 top_k: int, mix: str = "softmax", temperature: float = 1.0,
                 embeddings: torch.Tensor | None = None, gates: nn.ModuleList | None = None):
        super().__init__()
        if method not in ("retrieve", "gate"):
            raise ValueError(f"unknown routing method {method!r}")
        self.model, self.names, self.method = model, list(names), method
        self.top_k, self.mix, self.temperature = top_k, mix, temperature
        self.coefficients = Coefficients()
        self.targets = attach(model, adapters, self.coefficients)
        if method == "retrieve":
            self.register_buffer("embeddings", nn.functional.normalize(embeddings.float(), dim=-1))
        else:
            self.gates = gates
            for index, layer in enumerate(decoder_layers(model)):
                layer.register_forward_pre_hook(self._gate_hook(index))

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- retrieve: one choice per sequence ---------------------------------------------
    def retrieval_weights(self, input_ids, attention_mask=None) -> torch.Tensor:
        """[batch, 1, N]: top-k adapters by cosine similarity of the input's embedding
        (computed with every adapter switched off) to each adapter's embedding."""
        count = len(self.names)
        self.coefficients.shared = torch.zeros(input_ids.shape[0], 1, count)
        query = nn.functional.normalize(mean_hidden_state(self.model, input_ids, attention_mask).float(), dim=-1)
        similarity = query @ self.embeddings.t()
        return top_k_weights(similarity, self.top_k, self.mix, self.temperature).unsqueeze(1)

    # ---- gate: one choice per token and layer --------------------------------------------
    def _gate_hook(self, index: int):
        def hook(_module, args):
            logits = self.gates[index](args[0].to(self.gates[index].weight.dtype))
            self.coefficients.per_layer[index] = top_k_weights(logits, self.top_k, "softmax", self.temperature)
        return hook

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if self.method == "retrieve":
            self.coefficients.shared = self.retrieval_weights(input_ids, attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Retrieval picks the adapters once from the prompt; gates run at every step."""
        if self.method == "retrieve":
            self.coefficients.shared = self.retrieval_weights(input_ids, attention_mask)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def chosen(self, input_ids, attention_mask=None) -> list[list[str]]:
        """Names of the adapters retrieval picks for each sequence (for reports and tests)."""
        weights = self.retrieval_weights(input_ids, attention_mask)[:, 0]
        return [[self.names[i] for i in row.nonzero().flatten().tolist()] for row in weights]


def prompt_embedding(model: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """An adapter's retrieval key: the embedder's vector averaged over its sample prompts
    (each prompt embedded on its own, so padding never enters)."""
    vectors = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            vectors.append(mean_hidden_state(model, ids, None)[0].float())
    return torch.stack(vectors).mean(dim=0)


def new_gates(model: nn.Module, count: int) -> nn.ModuleList:
    """One linear gate per decoder layer, hidden -> N, zero-initialised: every adapter
    gets the same weight until the gates are trained."""
    hidden = model.config.hidden_size
    gates = nn.ModuleList(nn.Linear(hidden, count, bias=False) for _ in decoder_layers(model))
    for gate in gates:
        nn.init.zeros_(gate.weight)
    return gates


def train_gates(mixture: AdapterMixture, batches: list[torch.Tensor], steps: int, lr: float,
                seed: int, on_step=lambda step, loss: None) -> list[float]:
    """Fit the gates (nothing else) to next-token loss on `batches` of token ids, cycled
    in order for `steps` steps of Adam; returns the loss of every step."""
    torch.manual_seed(seed)
    for parameter in mixture.parameters():
        parameter.requires_grad_(False)
    trainable = list(mixture.gates.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(trainable, lr=lr)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = mixture(ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        on_step(step + 1, losses[-1])
    for parameter in trainable:
        parameter.requires_grad_(False)
    return losses


# ---- artifacts: the base model + adapters.safetensors + router.safetensors ---------------

ADAPTERS_FILE = "adapters.safetensors"
ROUTER_FILE = "router.safetensors"


def adapter_tensors(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """`N.MODULE.down|up|scale` for adapter N (in routing order) and each of its modules."""
    tensors = {}
    for index, adapter in enumerate(adapters):
        for module, factors in adapter.items():
            tensors[f"{index}.{module}.down"] = factors.down.contiguous()
            tensors[f"{index}.{module}.up"] = factors.up.contiguous()
            tensors[f"{index}.{module}.scale"] = torch.tensor(float(factors.scale), dtype=torch.float64)
    return tensors


def adapters_from_tensors(tensors: dict[str, torch.Tensor], count: int) -> list[Adapter]:
    adapters: list[Adapter] = [{} for _ in range(count)]
    for name in tensors:
        if name.endswith(".down"):
            index, module = name[:-len(".down")].split(".", 1)
            prefix = name[:-len(".down")]
            adapters[int(index)][module] = LoraFactors(tensors[name], tensors[f"{prefix}.up"],
                                                       float(tensors[f"{prefix}.scale"]))
    return adapters


def load_mixture(model: nn.Module, directory, routing: dict) -> AdapterMixture:
    """The mixture an `adapter-routed` artifact describes, around its loaded base `model`."""
    from safetensors.torch import load_file

    names = routing["adapters"]
    adapters = adapters_from_tensors(load_file(Path(directory) / ADAPTERS_FILE), len(names))
    router = load_file(Path(directory) / ROUTER_FILE)
    options = {"top_k": routing["top_k"], "temperature": routing["temperature"]}
    if routing["method"] == "retrieve":
        return AdapterMixture(model, adapters, names, "retrieve", mix=routing["mix"],
                              embeddings=router["embeddings"], **options).eval()
    gates = new_gates(model, len(names))
    for index, gate in enumerate(gates):
        gate.weight.data = router[f"gates.{index}.weight"].to(gate.weight.dtype)
    return AdapterMixture(model, adapters, names, "gate", gates=gates, **options).eval()
