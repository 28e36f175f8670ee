"""Adapters while executing. An adapter is small, so each adapter provider computes a
whole `LoraAdapter` once, on first use: read from a PEFT directory, trained, extracted
from a fine-tune, or merged from other adapters. `AttachProvider` is a model provider
that fuses adapters into its base's weights a block of rows at a time."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from cfmlang.ops.lora.peft_dirs import CONFIG_FILE, WEIGHTS_FILE
from cfmlang.compiler.ir import (AttachNode, LoraExtractNode, LoraMergeNode, LoraSourceNode, LoraTrainNode,
                                 TensorSpec)
from cfmlang.io.materialise import materialise
from cfmlang.io.weights import DTYPE_CODES, NodeStats, Rows, WeightError
from cfmlang.ops.base import OnTrainStep
from cfmlang.ops.lora.factors import LoraAdapter, LoraFactors, adapter_from_peft, extract_low_rank, is_target, peft_config
from cfmlang.ops.lora.combine import combine
from cfmlang.ops.lora.train import read_samples, train

Progress = Callable[[int, int], None]


class AdapterProvider:
    """Computes its adapter once; `report` holds what the manifest records about it."""

    node_type = "adapter"

    def __init__(self, base):
        self.support_dir, self.config = base.support_dir, base.config   # the base model's
        self.base_path = getattr(base, "base_path", str(base.support_dir.resolve()))
        """What the adapter's config names as its base (`base_model_name_or_path`)."""
        self.stats = NodeStats()
        self.report: dict = {}
        self._adapter: LoraAdapter | None = None

    def adapter(self, progress: Progress | None = None) -> LoraAdapter:
        if self._adapter is None:
            self._adapter = self.build(progress or (lambda done, total: None))
            self.stats.tensors = 2 * len(self._adapter.modules)
        return self._adapter

    def build(self, progress: Progress) -> LoraAdapter:
        raise NotImplementedError

    @property
    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, tuple(t.shape), DTYPE_CODES[t.dtype])
                for n, t in self.adapter().peft_tensors().items()]


class PeftSourceProvider(AdapterProvider):
    def __init__(self, node: LoraSourceNode, base):
        super().__init__(base)
        self.node = node

    def build(self, progress: Progress) -> LoraAdapter:
        tensors = load_file(Path(self.node.source.path) / WEIGHTS_FILE)
        return adapter_from_peft(tensors, self.node.config)


class StoredAdapterProvider(AdapterProvider):
    """An adapter read back from its cache entry: a PEFT directory holding the base's
    support files, and the report recorded when it was computed (loss curve ...)."""

    def __init__(self, folder: Path, report: dict):
        self.folder = folder
        self.support_dir = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.adapter_config = json.loads((folder / CONFIG_FILE).read_text())
        self.base_path = self.adapter_config["base_model_name_or_path"]   # as computed, not the entry
        self.stats = NodeStats()
        self.report = report
        self._adapter = None

    def build(self, progress: Progress) -> LoraAdapter:
        return adapter_from_peft(load_file(self.folder / WEIGHTS_FILE), self.adapter_config)


class TrainProvider(AdapterProvider):
    """Loads the base as a transformers module (from any provider: a source, a merge ...)
    and trains a new adapter on it."""

    def __init__(self, node: LoraTrainNode, base, on_step: OnTrainStep):
        super().__init__(base)
        self.node, self.base, self.on_step = node, base, on_step

    def build(self, progress: Progress) -> LoraAdapter:
        options = dict(self.node.options)
        samples = read_samples(Path(self.node.data.path))
        model, tokenizer = materialise(self.base, self.node.span)

        def step(done: int, steps: int, loss: float) -> None:
            if not math.isfinite(loss):
                raise WeightError(f"training `{self.node.name}` diverged: the loss is {loss} at step {done}",
                                  self.node.span, "lower `lr`")
            self.on_step(self.node.name, done, steps, loss)

        adapter, losses = train(model, tokenizer, samples, options, step)
        self.report = {"loss": losses, "samples": len(samples)}
        return adapter


class MergedAdapterProvider(AdapterProvider):
    def __init__(self, node: LoraMergeNode, inputs: list[AdapterProvider], seed: int):
        super().__init__(inputs[0])
        self.node, self.inputs, self.seed = node, inputs, seed

    def build(self, progress: Progress) -> LoraAdapter:
        adapters = [p.adapter() for p in self.inputs]
        weights = [dict(i.params)["weight"] for i in self.node.inputs]
        try:
            return combine(adapters, weights, self.node.combination, dict(self.node.options), self.seed)
        except ValueError as exc:
            raise WeightError(f"merge `{self.node.name}` ({self.node.combination}): {exc}", self.node.span,
                              "use `cat`, `svd` or a `_svd` variant for adapters of different ranks") from None


class ExtractProvider(AdapterProvider):
    """The truncated SVD of (tuned - base) per target weight."""

    def __init__(self, node: LoraExtractNode, tuned, base):
        super().__init__(base)
        self.node, self.tuned, self.base = node, tuned, base

    def build(self, progress: Progress) -> LoraAdapter:
        targets = [s for s in self.base.specs if is_target(s.name, list(self.node.targets))]
        modules, ranks, errors = {}, {}, {}
        for done, spec in enumerate(targets, start=1):
            low = extract_low_rank(self.tuned.get(spec.name).float(), self.base.get(spec.name).float(),
                                   self.node.rank, self.node.threshold)
            module = spec.name.removesuffix(".weight")
            modules[module] = LoraFactors(low.down, low.up, 1.0)
            ranks[module], errors[spec.name] = low.down.shape[0], low.relative_error
            progress(done, len(targets))
        self.report = {"relative_error": errors, "ranks": ranks, "not_captured": list(self.changed_elsewhere(targets))}
        config = peft_config(self.node.rank, self.node.rank, list(self.node.targets), ranks=ranks)
        return LoraAdapter(modules, config)

    def changed_elsewhere(self, targets: list[TensorSpec]) -> tuple[str, ...]:
        names = {s.name for s in targets}
        return tuple(s.name for s in self.base.specs if s.name not in names
                     and not torch.equal(self.tuned.get(s.name), self.base.get(s.name)))


@dataclass
class AttachProvider:
    """The model's weights with each attached adapter's scale * B @ A added (PEFT's
    merge_and_unload): the delta is computed in float32 and added in the weight's dtype."""

    node: AttachNode
    model: object
    adapters: list[AdapterProvider]
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        self.support_dir, self.config = self.model.support_dir, self.model.config
        self.specs = self.model.specs

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        weight = self.model.get(name, rows)
        module = name.removesuffix(".weight")
        for provider in self.adapters:
            factors = provider.adapter().modules.get(module)
            if factors is not None:
                weight = weight + factors.delta(rows).to(weight.dtype)
        self.stats.count(name)
        return weight

