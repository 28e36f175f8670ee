"""Execute the graph: each node becomes a lazy tensor provider; the output node's
tensors are pulled one at a time into the artifact, so nothing is held whole."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import networkx as nx
import torch

from cfmlang.ops.adapter_routes.providers import AdapterRouteProvider
from cfmlang.ops.lora.providers import (AttachProvider, ExtractProvider, MergedAdapterProvider, OnTrainStep,
                                      PeftSourceProvider, TrainProvider)
from cfmlang.ops.experts.providers import ExpertsProvider, RouteProvider
from cfmlang.compiler.graph import execution_order
from cfmlang.compiler.ir import (FLOAT_DTYPES, AdapterRouteNode, AttachNode, CheckedProgram, EditNode, ExpertsNode,
                                 FinetuneNode, GrowNode, LoraExtractNode, LoraMergeNode, LoraSourceNode, LoraTrainNode,
                                 MergeNode, ModelNode, RouteNode, TensorSpec, layer_index)
from cfmlang.io.materialise import materialise
from cfmlang.io.sources import SourceError, weight_files
from cfmlang.io.weights import TORCH_DTYPES, NodeStats, Rows, SafetensorsReader, WeightError, open_source
from cfmlang.diagnostics import CompileError
from cfmlang.ops import lookup
from cfmlang.ops.update.report import measured
from cfmlang.ops.update.editing import EditError, Request
from cfmlang.ops.update.finetune import DataError, Training, finetune, read_texts
from cfmlang.ops.merge.base import MergeContext, MergeError
from cfmlang.ops.registry import evaluate


class Provider(Protocol):
    specs: list[TensorSpec]
    support_dir: Path       # tokenizer and generation config of the output
    config: dict            # its config.json


    def get(self, name: str, rows: Rows = None) -> torch.Tensor: ...


@dataclass
class SourceProvider:
    reader: Any
    support_dir: Path
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        self.config = json.loads((self.support_dir / "config.json").read_text())

    @property
    def specs(self) -> list[TensorSpec]:
        return self.reader.specs

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        self.stats.count(name)
        return self.reader.get(name, rows)


@dataclass
class MergeProvider:
    node: MergeNode
    inputs: list[Provider]
    base: Provider | None
    dtype: str | None
    seed: int
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        self.method = lookup("merge", self.node.method)
        self.options = dict(self.node.options)
        self.num_layers = self.node.arch.num_layers
        first = self.base or self.inputs[0]
        self.support_dir, self.config = first.support_dir, first.config
        self.specs = [TensorSpec(s.name, s.shape, self.dtype or s.dtype) for s in first.specs]
        self._whole: tuple[str, torch.Tensor | None] = ("", None)

    def layer_t(self, name: str) -> float:
        layer = layer_index(name)
        if layer is None:
            return 0.0
        return layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    def load(self, provider: Provider, name: str, rows: Rows) -> torch.Tensor:
        tensor = provider.get(name, rows)
        if not tensor.is_floating_point():
            raise WeightError(f"merge `{self.node.name}`: tensor `{name}` has dtype "
                              f"{str(tensor.dtype).removeprefix('torch.')}; merges need floating-point tensors",
                              self.node.span, "the checkpoint is damaged or not a model's weights")
        return tensor.to(TORCH_DTYPES[self.dtype]) if self.dtype else tensor

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        """Elementwise methods compute any block of rows on its own; others compute the
        whole tensor once and hand out its rows."""
        if rows is None or self.method.elementwise:
            return self.compute(name, rows)
        if self._whole[0] != name:
            self._whole = ("", None)   # let the previous tensor go before computing this one
            self._whole = (name, self.compute(name, None))
        return self._whole[1][rows[0]:rows[1]]

    def compute(self, name: str, rows: Rows) -> torch.Tensor:
        t = self.layer_t(name)
        tensors = [self.load(p, name, rows) for p in self.inputs]
        base = self.load(self.base, name, rows) if self.base is not None else None
        weights = [{k: evaluate(v, name, t) for k, v in i.params} for i in self.node.inputs]
        options = {k: evaluate(v, name, t) for k, v in self.options.items()}
        context = MergeContext(self.node.name, name, self.seed)
        try:
            result = self.method.merge(tensors, base, weights, options, context)
        except MergeError as exc:
            raise WeightError(f"merge `{self.node.name}` ({self.node.method}), tensor `{name}`: {exc}",
                              self.node.span, exc.help) from None
        if result.is_floating_point() and not all_finite(result):
            raise self.non_finite(name, tensors, base)
        self.stats.count(name)
        want = TORCH_DTYPES[self.dtype] if self.dtype else (tensors[0] if tensors else base).dtype
        return result.to(want)


    def non_finite(self, name: str, tensors: list[torch.Tensor], base) -> WeightError:
        """Name the input that holds NaN/inf, or blame the merge when the inputs are finite."""
        named = [(i.model, t) for i, t in zip(self.node.inputs, tensors)]
        named += [(self.node.base, base)] if base is not None else []
        for model, tensor in named:
            if not all_finite(tensor):
                return WeightError(f"merge `{self.node.name}`: input `{model}` holds NaN or infinite "
                                   f"values in tensor `{name}`", self.node.span,
                                   f"the weights of `{model}` are damaged; download or convert them again")
        return WeightError(f"merge `{self.node.name}` produced NaN or infinite values in "
                           f"tensor `{name}`", self.node.span)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or infinite. min/max propagate NaN and expose +-inf,
    and unlike isfinite() they allocate no tensor-sized mask."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


@dataclass
class EditProvider:
    """A knowledge edit: on first use the input model is materialised, edited and
    measured; the changed weights are then served from memory, every other tensor
    straight from the input."""

    node: EditNode
    source: Provider
    seed: int
    log: Callable[[str], None]
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        self.specs, self.support_dir, self.config = self.source.specs, self.source.support_dir, self.source.config
        self.changed: dict[str, torch.Tensor] | None = None
        self.report: dict | None = None

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        if self.changed is None:
            self.changed = self.run()
        if name not in self.changed:
            return self.source.get(name, rows)
        self.stats.count(name)
        tensor = self.changed[name]
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def run(self) -> dict[str, torch.Tensor]:
        method, options = lookup("update", self.node.method), dict(self.node.options)
        self.log(f"update `{self.node.name}`: {self.node.method} with {len(self.node.facts)} fact(s)")
        model, tokenizer = materialise(self.source, self.node.span)
        requests = [Request(f.prompt, f.subject, f.target) for f in self.node.facts]
        try:
            outcome, self.report = measured(
                model, tokenizer, self.node.facts, self.node.neighbourhood, options["report_tokens"],
                lambda: method.edit(model, tokenizer, requests, options, self.seed, self.log), self.log)
        except EditError as exc:
            raise WeightError(f"update `{self.node.name}` ({self.node.method}): {exc}", self.node.span,
                              exc.help) from None
        dtypes = {s.name: TORCH_DTYPES[s.dtype] for s in self.specs}
        return {name: weight.to(dtypes[name]) for name, weight in outcome.weights.items()}


@dataclass
class FinetuneProvider:
    """Fine-tuning of selected bricks: on first use the input model is materialised and
    trained; the trained tensors are served from memory, every other tensor straight from
    the input (so frozen weights are bit-identical)."""

    node: FinetuneNode
    source: Provider
    seed: int
    log: Callable[[str], None]
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        self.specs, self.support_dir, self.config = self.source.specs, self.source.support_dir, self.source.config
        self.changed: dict[str, torch.Tensor] | None = None
        self.training: Training | None = None

    get = EditProvider.get

    def run(self) -> dict[str, torch.Tensor]:
        self.log(f"update `{self.node.name}`: finetune {', '.join(self.node.train)} on {Path(self.node.data).name}")
        model, tokenizer = materialise(self.source, self.node.span)
        try:
            self.training = finetune(model, tokenizer, self.node.train, read_texts(Path(self.node.data)),
                                     dict(self.node.options), self.seed, self.log)
        except DataError as exc:
            raise WeightError(f"update `{self.node.name}` (finetune): {exc}", self.node.span) from None
        dtypes = {s.name: TORCH_DTYPES[s.dtype] for s in self.specs}
        return {name: weight.to(dtypes[name]) for name, weight in self.training.weights.items()}


@dataclass(frozen=True)
class Execution:
    output: Provider
    providers: dict[str, Provider]
    order: tuple[str, ...]


def execute(program: CheckedProgram, graph: nx.DiGraph, cache_dir: Path, log=print,
            on_train_step: OnTrainStep = lambda name, step, steps, loss: None) -> Execution:
    """Open every source and wire the providers in dependency order (no math yet)."""
    providers: dict[str, Provider] = {}
    order = execution_order(graph)
    for name in order:
        providers[name] = make_provider(program, program.node(name), providers, cache_dir, log, on_train_step)
    return Execution(providers[program.output], providers, tuple(order))


def make_provider(program: CheckedProgram, node, providers: dict[str, Provider], cache_dir: Path,
                  log=print, on_train_step: OnTrainStep = lambda name, step, steps, loss: None) -> Provider:
    """The lazy provider of one node, reading from the providers of its inputs."""
    if isinstance(node, ModelNode):
        try:
            reader, folder = open_source(node.source, node.allow_pickle, cache_dir, log)
        except SourceError as exc:
            raise CompileError([exc.diagnostic(node.span)]) from None
        return SourceProvider(reader, folder)
    if isinstance(node, LoraExtractNode):
        return ExtractProvider(node, providers[node.tuned], providers[node.base])
    if isinstance(node, LoraSourceNode):
        return PeftSourceProvider(node, providers[node.base])
    if isinstance(node, LoraTrainNode):
        return TrainProvider(node, providers[node.base], on_train_step)
    if isinstance(node, LoraMergeNode):
        return MergedAdapterProvider(node, [providers[i.model] for i in node.inputs], node_seed(program, node))
    if isinstance(node, AttachNode):
        return AttachProvider(node, providers[node.model], [providers[a] for a in node.adapters])
    if isinstance(node, ExpertsNode):
        return ExpertsProvider(node, providers[node.model], node_seed(program, node), NodeStats())
    if isinstance(node, RouteNode):
        return RouteProvider(node, providers[node.experts], node_seed(program, node), NodeStats())
    if isinstance(node, EditNode):
        return EditProvider(node, providers[node.model], node_seed(program, node), log)
    if isinstance(node, FinetuneNode):
        return FinetuneProvider(node, providers[node.model], node_seed(program, node), log)
    if isinstance(node, AdapterRouteNode):
        return AdapterRouteProvider(node, providers[node.base], [providers[a] for a in node.adapters], on_train_step)
    if isinstance(node, GrowNode):
        from cfmlang.ops.grow.providers import grow_provider

        return grow_provider(node, providers, node_seed(program, node))
    dtype = node.dtype or program.dtype
    return MergeProvider(
        node, [providers[i.model] for i in node.inputs],
        providers[node.base] if node.base else None,
        None if dtype is None else FLOAT_DTYPES[dtype],
        node_seed(program, node))


def node_seed(program: CheckedProgram, node) -> int:
    return program.seed if node.seed is None else node.seed


def stored_provider(folder: Path) -> SourceProvider:
    """A provider serving the tensors of an artifact-like folder (a cache entry)."""
    return SourceProvider(SafetensorsReader(weight_files(folder, False)), folder)
