"""Routing over LoRA adapters at run time: every adapter's factors stacked per linear
module, per sequence (`retrieve`, LoraRetriever-style) or per token (`gate`, a small gate
per decoder layer, X-LoRA/MoLE-style).

The N adapters' factors are zero-padded to one rank R and stacked, A: [N, R, in] and
B: [N, R, out] (the scale folded into B). Retrieval picks k adapters per sequence
(`chosen` [batch, k], mixing `weights` [batch, k]); each adapted linear gathers only those:

    y = W x + (x @ A[chosen]^T) @ (repeat(weights, R) * B[chosen])        A[chosen]: [batch, k*R, in]

an index_select and two batched matmuls, k static; the gathered factors are kept for as
long as the selection holds (a generation's decoding steps). A gate mixes every adapter per token
with weights c [batch, tokens, N], so its linears stay dense:

    y = W x + ((x @ A_all^T) * repeat(c, R)) @ B_all                       A_all: [N*R, in]

Neither has data-dependent shapes or Python branching per input, so `torch.export`
captures the module whole.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from cfmlang.ops.lora.factors import LoraFactors

MIXES = ("softmax", "uniform")

Adapter = dict[str, LoraFactors]
"""Factors by module path (e.g. the adapted linear's path in the base, e.g. `<layers>.0.<query projection>`): the `modules` of a
compiled lora brick (`cfmlang.ops.lora.factors.LoraAdapter`)."""


class Coefficients:
    """What the adapted linears read during one forward pass: the adapters `chosen` for
    each sequence [batch, k] and their mixing `weights` [batch, k] (retrieve), or the
    weights of every adapter per token [batch, tokens, N] for each decoder layer (gate).
    While `active` is False the linears compute the base model alone (the embedder).
    `gathered` holds each SelectedLinear's factors for the current selection: gathered
    once, on the prompt's forward pass, and reused by every decoding step after it."""

    def __init__(self):
        self.chosen: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.per_layer: dict[int, torch.Tensor] = {}
        self.active = True
        self.gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(self, chosen: torch.Tensor, weights: torch.Tensor) -> None:
        self.chosen, self.weights = chosen, weights
        self.gathered = {}


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus N stacked LoRA deltas, A [N, R, in] and B [N, R, out]."""

    def __init__(self, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, layer: int,
                 coefficients: Coefficients):
        super().__init__()
        self.base = base
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.rank = down.shape[1]
        self.layer = layer
        self.coefficients = coefficients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.coefficients.active:
            return self.base(x)
        return self.base(x) + self.delta(x)


class SelectedLinear(AdaptedLinear):
    """Retrieval: each sequence applies only its k chosen adapters, gathered by index."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        key = id(self)
        if key not in self.coefficients.gathered:
            self.coefficients.gathered[key] = self.gather(x.dtype)
        down, up = self.coefficients.gathered[key]
        return torch.matmul(torch.matmul(x, down), up)

    def gather(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[chosen]^T [batch, in, k*R], B[chosen] [batch, k*R, out] with each adapter's
        mixing weight folded in)."""
        chosen, weights = self.coefficients.chosen, self.coefficients.weights
        batch, k = chosen.shape
        flat = chosen.reshape(-1)
        down = self.down.index_select(0, flat).reshape(batch, k * self.rank, -1)
        mix = weights.to(dtype).repeat_interleave(self.rank, dim=-1).unsqueeze(-1)   # [batch, k*R, 1]
        up = self.up.index_select(0, flat).reshape(batch, k * self.rank, -1) * mix
        return down.transpose(1, 2), up


class MixedLinear(AdaptedLinear):
    """Gate: every adapter, weighted per token."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.coefficients.per_layer[self.layer].to(x.dtype)                 # [batch, tokens, N]
        hidden = (x @ self.down.flatten(0, 1).t()).unflatten(-1, (mix.shape[-1], self.rank))
        return (hidden * mix.unsqueeze(-1)).flatten(-2) @ self.up.flatten(0, 1)


def stacked(adapters: list[Adapter], module: str, base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [N, R, in], B [N, R, out] with the scale folded in): adapters without this
    module, and ranks below R, get zero rows, which add exactly nothing."""
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
    return down, up


def layer_of(module: str) -> int:
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1])


def attach(model: nn.Module, adapters: list[Adapter], coefficients: Coefficients,
           linear: type[AdaptedLinear]) -> list[str]:
    """Replace every linear module that some adapter targets by a `linear` (SelectedLinear
    or MixedLinear); returns the module paths replaced."""
    modules = sorted({m for adapter in adapters for m in adapter})
    for module in modules:
        parent_path, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        down, up = stacked(adapters, module, base)
        setattr(parent, child, linear(base, down, up, layer_of(module), coefficients))
    return modules


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule("model.layers")


def top_k_choice(scores: torch.Tensor, k: int, mix: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the k best scores, their mixing weights) over the last dimension: a
    softmax of score / temperature, or 1/k each. Static shapes throughout."""
    best, chosen = torch.topk(scores, k, dim=-1)
    if mix == "softmax":
        return chosen, torch.softmax(best / temperature, dim=-1)
    return chosen, torch.full_like(best, 1.0 / k)


def top_k_weights(scores: torch.Tensor, k: int, mix: str, temperature: float) -> torch.Tensor:
    """The same choice as dense weights: zero outside the k best scores."""
    chosen, weights = top_k_choice(scores, k, mix, temperature)
    return torch.zeros_like(scores).scatter(-1, chosen, weights)


@contextmanager
def first_layers(model: nn.Module, count: int | None):
    """While inside, the model runs only its first `count` decoder layers (all for None)."""
    inner = model.get_submodule("model")
    every = inner.layers
    if count is not None:
        inner.layers = every[:count]
    try:
        yield
    finally:
        inner.layers = every


def mean_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      layers: int | None = None) -> torch.Tensor:
    """The embedder: the hidden state after the first `layers` decoder layers (all by
    default) and the final norm, averaged over the (unpadded) tokens, [batch, hidden]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with first_layers(model, layers):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class AdapterMixture(nn.Module):
    """A causal LM whose LoRA adapters are mixed per input. `forward` and `generate`
    take and return what the wrapped transformers model does."""

    def __init__(self, model: nn.Module, adapters: list[Adapter], names: list[str], method: str,
                 top_k: int, mix: str = "softmax", temperature: float = 1.0,
                 embeddings: torch.Tensor | None = None, embed_layers: int | None = None,
                 gates: nn.ModuleList | None = None):
        super().__init__()
        if method not in ("retrieve", "gate"):
            raise ValueError(f"unknown routing method {method!r}")
        self.model, self.names, self.method = model, list(names), method
        self.top_k, self.mix, self.temperature = top_k, mix, temperature
        self.embed_layers = embed_layers
        self.coefficients = Coefficients()
        linear = SelectedLinear if method == "retrieve" else MixedLinear
        self.targets = attach(model, adapters, self.coefficients, linear)
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
    def retrieval_choice(self, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [batch, k], weights [batch, k]): the top-k adapters by cosine similarity
        of the input's embedding (the base model alone, every adapter switched off, its
        first `embed_layers` layers) to each adapter's embedding."""
        self.coefficients.active = False
        try:
            hidden = mean_hidden_state(self.model, input_ids, attention_mask, self.embed_layers)
        finally:
            self.coefficients.active = True
        similarity = nn.functional.normalize(hidden.float(), dim=-1) @ self.embeddings.t()
        return top_k_choice(similarity, self.top_k, self.mix, self.temperature)

    # ---- gate: one choice per token and layer --------------------------------------------
    def _gate_hook(self, index: int):
        def hook(_module, args):
            logits = self.gates[index](args[0].to(self.gates[index].weight.dtype))
            self.coefficients.per_layer[index] = top_k_weights(logits, self.top_k, "softmax", self.temperature)
        return hook

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if self.method == "retrieve":
            self.coefficients.select(*self.retrieval_choice(input_ids, attention_mask))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Retrieval picks the adapters once from the prompt; gates run at every step."""
        if self.method == "retrieve":
            self.coefficients.select(*self.retrieval_choice(input_ids, attention_mask))
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def chosen(self, input_ids, attention_mask=None) -> list[list[str]]:
        """Names of the adapters retrieval picks for each sequence, best first (for
        reports and tests)."""
        chosen, _ = self.retrieval_choice(input_ids, attention_mask)
        return [[self.names[i] for i in row] for row in chosen.tolist()]


def prompt_embedding(model: nn.Module, tokenizer, prompts: list[str], layers: int | None = None) -> torch.Tensor:
    """An adapter's retrieval key: the embedder's vector averaged over its sample prompts
    (each prompt embedded on its own, so padding never enters)."""
    vectors = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            vectors.append(mean_hidden_state(model, ids, None, layers)[0].float())
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
                              embeddings=router["embeddings"], embed_layers=routing.get("embed_layers"),
                              **options).eval()
    gates = new_gates(model, len(names))
    for index, gate in enumerate(gates):
        gate.weight.data = router[f"gates.{index}.weight"].to(gate.weight.dtype)
    return AdapterMixture(model, adapters, names, "gate", gates=gates, **options).eval()
