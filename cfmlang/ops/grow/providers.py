"""Lazy tensor providers of grown models (part of the execute stage).

Depth methods copy, zero or scale tensors of their inputs under new layer indices;
widen and upcycle compute a layer's MLP tensors from the input's, one tensor at a time.
Random draws (new neurons, routers) come from generators seeded per (seed, node, tensor
or layer), so artifacts are byte-identical from run to run. Each provider's `reference`
is the provider of the model it is verified against (its first input)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from cfmlang.io.weights import NodeStats
from cfmlang.architectures import describe
from cfmlang.compiler.ir import FLOAT_DTYPES, GrowNode
from cfmlang.io.materialise import materialise
from cfmlang.io.weights import TORCH_DTYPES, Rows
from cfmlang.ops.grow.shapes import (ffn_part, cast_spec, depth_config, depth_origins, neuron_sources, router_weight, upcycle_config,
                                 upcycled_specs, widen_config, widen_tensor, widened_spec)
from cfmlang.ops.grow.prompt_gates import PROMPTED_MODES, prompted_gates, random_gates
from cfmlang.ops.merge.base import MergeContext


class _WholeTensors:
    """Hands out rows of a tensor computed whole, keeping only the latest one."""

    def __init__(self):
        self.name, self.tensor = "", None

    def rows(self, name: str, rows: Rows, compute) -> torch.Tensor:
        if self.name != name:
            self.name, self.tensor = "", None   # let the previous tensor go first
            self.name, self.tensor = name, compute()
        return self.tensor if rows is None else self.tensor[rows[0]:rows[1]]


@dataclass
class DepthProvider:
    """block_expand and stack: every output layer is a layer of an input."""

    node: GrowNode
    inputs: dict
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        first = self.reference = self.inputs[self.node.inputs[0]]
        self.support_dir = first.support_dir
        dtype_name = dict(self.node.options).get("dtype")
        self.dtype = FLOAT_DTYPES[dtype_name] if dtype_name else None   # the output dtype's code, as merges'
        layout = self.node.arch.layout
        origins = depth_origins(self.node.layers, {m: p.specs for m, p in self.inputs.items()}, layout)
        self.origins = {name: (cast_spec(spec, dtype_name), origin) for name, (spec, origin) in origins.items()}
        self.specs = [spec for spec, _ in self.origins.values()]
        self.config = depth_config({m: p.config for m, p in self.inputs.items()}, self.node.layers, layout)

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        spec, origin = self.origins[name]
        self.stats.count(name)
        if origin.zero:
            shape = spec.shape if rows is None else (rows[1] - rows[0],) + spec.shape[1:]
            return torch.zeros(shape, dtype=TORCH_DTYPES[spec.dtype])
        tensor = self.inputs[origin.model].get(origin.name, rows).to(TORCH_DTYPES[spec.dtype])
        return tensor if origin.scale is None else tensor * origin.scale


@dataclass
class WidenProvider:
    """widen: MLP tensors get new neurons; everything else is passed through."""

    node: GrowNode
    source: object
    seed: int
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        options = dict(self.node.options)
        self.size, self.init = options["intermediate_size"], options["init"]
        self.reference = self.source
        self.support_dir = self.source.support_dir
        self.specs = [widened_spec(s, self.size, self.node.arch.layout) for s in self.source.specs]
        self.config = widen_config(self.source.config, self.size, self.node.arch.layout)
        self.whole = _WholeTensors()

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        part = ffn_part(self.node.arch.layout, name)
        self.stats.count(name)
        if part is None or part == ("ffn.down", "bias"):
            return self.source.get(name, rows)
        return self.whole.rows(name, rows, lambda: self.widened(name, part[0]))

    def widened(self, name: str, role: str) -> torch.Tensor:
        tensor = self.source.get(name)
        current = tensor.shape[-1] if role == "ffn.down" else tensor.shape[0]
        layer = self.node.arch.layer_of(name)
        sources = neuron_sources(current, self.size, self.generator(f"layer {layer} neurons"))
        return widen_tensor(tensor, role, sources, self.init, self.generator(name))

    def generator(self, what: str) -> torch.Generator:
        return MergeContext(self.node.name, what, self.seed).generator()


@dataclass
class UpcycleProvider:
    """upcycle: each MLP becomes `experts` copies of itself plus a new router."""

    node: GrowNode
    source: object
    seed: int
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        options = dict(self.node.options)
        self.router_std = options["router_std"]
        self.reference = self.source
        self.plan = upcycled_specs(self.source.specs, options["experts"], describe(self.source.config))
        self.specs = [spec for spec, _ in self.plan.values()]
        self.support_dir = self.source.support_dir
        self.config = upcycle_config(self.source.config, options["experts"], options["top_k"])
        self.whole = _WholeTensors()

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        spec, origin = self.plan[name]
        self.stats.count(name)
        if origin:
            return self.source.get(origin, rows)
        generator = MergeContext(self.node.name, name, self.seed).generator()
        return self.whole.rows(name, rows, lambda: router_weight(spec, self.router_std, generator)
                               .to(TORCH_DTYPES[spec.dtype]))


@dataclass
class MoeProvider:
    """moe: attention and embeddings from the base, each layer's experts from the FFNs of
    the expert models, routers from the experts' prompts (mergekit-moe semantics)."""

    node: GrowNode
    inputs: dict
    seed: int
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        options = dict(self.node.options)
        self.experts, self.gate_mode = options["experts"], options["gate_mode"]
        self.base = self.inputs[self.node.inputs[0]]
        self.plan = upcycled_specs(self.base.specs, len(self.experts), describe(self.base.config))
        self.specs = [spec for spec, _ in self.plan.values()]
        self.support_dir = self.base.support_dir
        self.config = upcycle_config(self.base.config, len(self.experts), options["experts_per_token"])
        self.whole = _WholeTensors()
        self._gates: torch.Tensor | None = None

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        spec, origin = self.plan[name]
        self.stats.count(name)
        if not origin:
            layer = self.node.arch.layer_of(name)
            return self.whole.rows(name, rows, lambda: self.gates()[layer].to(TORCH_DTYPES[spec.dtype]))
        match = EXPERT_RE.search(name)
        if match is None:
            return self.base.get(origin, rows)
        index, role = int(match.group(1)), match.group(2)
        model, _, _, noise, residual = self.experts[index]
        if noise is None and (residual is None or role != "w2"):
            return self.inputs[model].get(origin, rows)
        return self.whole.rows(name, rows, lambda: self.perturbed(model, origin, name, noise,
                                                                  residual if role == "w2" else None))

    def perturbed(self, model: str, origin: str, name: str, noise, residual) -> torch.Tensor:
        tensor = self.inputs[model].get(origin)
        if noise is not None:
            generator = MergeContext(self.node.name, name, self.seed).generator()
            tensor = tensor + torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * noise
        return tensor if residual is None else tensor * residual

    def gates(self) -> torch.Tensor:
        """[layers, experts, hidden], computed once."""
        if self._gates is None:
            self._gates = moe_gates(self.node, self.base, self.experts, self.gate_mode, self.seed)
        return self._gates


EXPERT_RE = re.compile(r"\.experts\.(\d+)\.(w[123])\.")


def moe_gates(node: GrowNode, base, experts, mode: str, seed: int) -> torch.Tensor:
    arch = node.arch
    if mode not in PROMPTED_MODES:
        generator = MergeContext(node.name, "routers", seed).generator()
        return random_gates(mode, arch.num_layers, len(experts), arch.hidden_size, generator)
    model, tokenizer = materialise(base, node.span)
    tokenizer.padding_side = "left"          # as mergekit-moe: the last position is a real token
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return prompted_gates(mode, model, tokenizer, [(list(pos), list(neg)) for _, pos, neg, _, _ in experts])


def depth_provider(node: GrowNode, providers: dict, seed: int) -> DepthProvider:
    """Every output layer a layer of an input (block_expand, stack, and any method whose
    plan lists the origin of each output layer)."""
    return DepthProvider(node, {m: providers[m] for m in node.inputs})


def widen_provider(node: GrowNode, providers: dict, seed: int) -> WidenProvider:
    return WidenProvider(node, providers[node.inputs[0]], seed)


def upcycle_provider(node: GrowNode, providers: dict, seed: int) -> UpcycleProvider:
    return UpcycleProvider(node, providers[node.inputs[0]], seed)


def moe_provider(node: GrowNode, providers: dict, seed: int) -> MoeProvider:
    return MoeProvider(node, {m: providers[m] for m in node.inputs}, seed)
