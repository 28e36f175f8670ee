"""Executing expert bricks and top-k routes (part of the execute stage).

An ExpertsProvider computes each selected layer's neuron partition when first asked
(kmeans and random from that layer's weights; cooccurrence from calibration
activations of the whole dense model, run once; functional from the FuncScores of every
neuron on the probe prompts, computed once). A RouteProvider serves the model's
tensors with each routed FFN's neurons reordered expert by expert, and builds the
routers (`routing_tensors`) for routing.safetensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cfmlang.analysis.funcscore import func_scores
from cfmlang.analysis.probes import PROBE_TOKENS, read_probes, tokenize
from cfmlang.compiler.ir import Calibration, ExpertsNode, RouteNode, TensorSpec
from cfmlang.io.weights import Rows
from cfmlang.runtime.routed_mlp import pack
from cfmlang.ops.experts.calibration import dense_model, ffn_inputs, load_tokenizer, token_windows
from cfmlang.ops.experts.partition import cooccurrence_split, functional_split, kmeans_split, order_of, random_split
from cfmlang.ops.experts.routers import NEEDS_DATA, BuiltRouter, build_router

FFN_ROLES = {"gate_proj": "ffn.gate", "up_proj": "ffn.up", "down_proj": "ffn.down"}
"""The FFN projections an expert split permutes, by the names routers and RoutedMLP use."""


def activation_function(folder: Path):
    from transformers.activations import ACT2FN

    config = json.loads((folder / "config.json").read_text())
    return ACT2FN[config.get("hidden_act", "silu")]


@dataclass
class ExpertsProvider:
    node: ExpertsNode
    model: object               # the Provider of the model whose FFNs are split
    seed: int
    stats: object               # weights.NodeStats: counts the layers partitioned
    _orders: dict[int, torch.Tensor] = field(default_factory=dict)
    _inputs: dict[Calibration, dict[int, torch.Tensor]] = field(default_factory=dict)
    _scores: torch.Tensor | None = None    # FuncScores [layers, neurons, abilities]

    def __post_init__(self):
        self.specs: list[TensorSpec] = self.model.specs
        self.support_dir: Path = self.model.support_dir
        self.config: dict = self.model.config
        self.act = activation_function(self.support_dir)

    def weight(self, layer: int, projection: str) -> torch.Tensor:
        return self.model.get(ffn_weight(self.node.arch.layout, layer, projection))

    def order(self, layer: int) -> torch.Tensor:
        """The permutation of this layer's neurons that lists them expert by expert."""
        if layer not in self._orders:
            self._orders[layer] = order_of(self.labels(layer))
            self.stats.count(f"layer {layer}")
        return self._orders[layer]

    def labels(self, layer: int) -> torch.Tensor:
        split, count, seed = self.node.split, self.node.count, self.seed + layer
        if split == "kmeans":
            return kmeans_split(self.weight(layer, "gate_proj"), self.weight(layer, "up_proj"), count, seed)
        if split == "random":
            return random_split(self.node.arch.intermediate_size, count, seed)
        if split == "functional":
            return functional_split(self.func_scores()[layer], count, seed)
        inputs = self.ffn_inputs(self.node.calibration)[layer]
        gate, up = self.weight(layer, "gate_proj").float(), self.weight(layer, "up_proj").float()
        return cooccurrence_split(self.act(inputs @ gate.t()) * (inputs @ up.t()), count, seed)

    def own_inputs(self) -> dict[int, torch.Tensor]:
        """The FFN inputs computed so far on the brick's own calibration text (none when
        its split did not need them)."""
        return self._inputs.get(self.node.calibration, {})

    def adopt(self, orders: dict[int, torch.Tensor], inputs: dict[int, torch.Tensor]) -> None:
        """Take the partition (and calibration inputs) stored by an earlier compile."""
        self._orders.update(orders)
        if inputs:
            self._inputs[self.node.calibration] = inputs

    def func_scores(self) -> torch.Tensor:
        """FuncScore of every FFN neuron for every ability of the probe set (run once)."""
        if self._scores is None:
            probe_dir = self.node.calibration.path
            texts, _ = read_probes(None if probe_dir is None else Path(probe_dir))
            tokenizer = load_tokenizer(self.support_dir, self.node.span)
            probes, _ = tokenize(texts, tokenizer, PROBE_TOKENS)
            model = dense_model(self.specs, self.model.get, self.support_dir)
            self._scores = func_scores(model, probes)
        return self._scores

    def ffn_inputs(self, calibration: Calibration) -> dict[int, torch.Tensor]:
        """The dense model's FFN inputs on the calibration text (run once per text)."""
        if calibration not in self._inputs:
            model = dense_model(self.specs, self.model.get, self.support_dir)
            tokenizer = load_tokenizer(self.support_dir, self.node.span)
            windows = token_windows(tokenizer, calibration, self.node.span, model, self.seed)
            self._inputs[calibration] = ffn_inputs(model, windows, self.node.layers)
        return self._inputs[calibration]


@dataclass
class RouteProvider:
    node: RouteNode
    experts: ExpertsProvider
    seed: int
    stats: object               # weights.NodeStats: counts the tensors served

    def __post_init__(self):
        self.specs = self.experts.specs
        self.support_dir, self.config = self.experts.support_dir, self.experts.config
        self.routed = set(self.experts.node.layers)

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        """The tensor; routed FFN weights with their neurons in expert order."""
        self.stats.count(name)
        layout = self.experts.node.arch.layout
        layer, role = layout.layer_of(name), layout.role_of(name)
        if layer not in self.routed or role not in FFN_ROLES.values() or not name.endswith(".weight"):
            return self.experts.model.get(name, rows)
        tensor = self.experts.model.get(name)
        order = self.experts.order(layer)
        permuted = tensor[:, order] if role == "ffn.down" else tensor[order]
        return permuted if rows is None else permuted[rows[0]:rows[1]]

    def packed_gate_up(self, layer: int) -> torch.Tensor:
        """[E, d, 2m]: the layer's gate and up weights packed as RoutedMLP packs them."""
        layout = self.experts.node.arch.layout
        gate, up, down = (self.get(ffn_weight(layout, layer, p)).float() for p in FFN_ROLES)
        return pack(gate, up, down, self.experts.node.count)[0]

    def routers(self) -> dict[int, BuiltRouter]:
        node = self.node
        inputs = self.experts.ffn_inputs(node.calibration) if node.router in NEEDS_DATA else {}
        return {layer: build_router(node.router, self.packed_gate_up(layer), self.experts.act,
                                    inputs.get(layer), node.k, node.epochs, self.seed + layer)
                for layer in self.experts.node.layers}


def ffn_weight(layout, layer: int, projection: str) -> str:
    """The weight name of a layer's FFN projection (`gate_proj`, `up_proj`, `down_proj`)."""
    return layout.module(layer, FFN_ROLES[projection]) + ".weight"
