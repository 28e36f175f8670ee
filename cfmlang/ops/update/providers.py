"""Providers of updated models: on first use the input model is materialised and edited
or trained; the changed tensors are then served from memory, every other tensor straight
from the input (so untouched weights are bit-identical)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cfmlang.compiler.ir import EditNode, FinetuneNode
from cfmlang.architectures import checkpoint_tensors
from cfmlang.io.materialise import materialise
from cfmlang.io.provider import Provider
from cfmlang.io.weights import TORCH_DTYPES, NodeStats, Rows, WeightError
from cfmlang.ops.registry import lookup
from cfmlang.ops.update.editing import EditError, Request
from cfmlang.ops.update.finetune import DataError, Training, finetune, read_texts
from cfmlang.ops.update.report import measured


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
        trained = checkpoint_tensors(model, self.training.weights)
        return {name: weight.to(dtypes[name]) for name, weight in trained.items()}
